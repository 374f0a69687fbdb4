"""Small libraries that two or more stages share.

Prompts, perceptual hashing, the training data loader, evaluation, fine-tuned model artifacts, the kNN
index format.
"""
