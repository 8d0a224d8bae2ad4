from pushagent.cli import main

main()
