"""Real training data: sources (folders, JSONL manifests), image transforms, aspect-ratio buckets, the feature
cache written by `pixart prepare`, and the loaders that read it (or encode on the fly)."""
