"""Privacy and quality: the memorization audit, duplicates, embeddings, metrics, evaluation, release report."""
