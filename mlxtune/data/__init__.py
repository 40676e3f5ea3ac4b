"""The data pipeline: records -> rendered text -> token ids + loss masks -> batches."""
