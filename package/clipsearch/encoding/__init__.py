"""Encoding an image collection into embedding shards: reader -> model -> writer, run per rank."""
