"""The jobs a run can be: pretraining, tokenizer training, fine-tuning, smoke."""
