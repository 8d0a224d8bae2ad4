"""What an operator sees and runs beside the data flow: progress, logs, metrics, status, doctor,
the end-of-run summary, queue views and the process memory policy."""
