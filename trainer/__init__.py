from trainer.allocator import reuse_large_blocks

reuse_large_blocks()  # before any tensor: see trainer/allocator.py
