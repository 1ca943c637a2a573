"""Build DeepSpeed's just-in-time CPU extension once, at install time.

On the CPU accelerator DeepSpeed compiles a shared-memory collective op into
~/.cache/torch_extensions the first time a process group starts. Ranks that start together race
for its lock, and a process killed while holding it leaves a lock that makes every later run wait
forever; building it here, in one process, keeps training runs away from the compiler.
"""
import os

if __name__ == "__main__":
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            builder.load(verbose=False)
