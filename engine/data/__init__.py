"""Data: tokenizer, datasets and preprocessing for pretraining, SFT, reward modelling and RLHF."""
