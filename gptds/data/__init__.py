"""The data pipeline: `prepare` turns text corpora and instruction records into uint16 token shards
with a manifest (sources.py reads inputs, instruct.py renders records, shards.py writes and checks
folders), and `loaders` streams them to the trainer as distributed, resumable batches."""
