"""Where records come from: local files and S3 objects (source.py, reader.py, s3.py), and the share of
them an array task takes (shard.py). Nothing here knows the search cluster."""
