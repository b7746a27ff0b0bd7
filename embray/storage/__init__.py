"""Storage: the store (local disk or S3), its layout, the source corpus, vectors, segments and row functions."""
