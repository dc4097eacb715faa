"""Runners for the same step code: local multiprocessing (`local`) and Apache Spark (`dedup.spark`)."""
