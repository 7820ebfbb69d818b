"""The PyTorch side: checkpoints, the model, ExpertsInt8, torch.export."""
