"""Input pipelines: TFDS data sets (built-in synthetic world, local files, real sets),
SentencePiece text, image preprocessing, masking, and the batch schema."""
