from trainer.allocator import reuse_freed_memory

reuse_freed_memory()  # before any tensor: see trainer/allocator.py
