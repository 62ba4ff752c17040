"""Modules over the public ops: drop-in where torch.nn has an equivalent, with torch's constructor arguments."""
