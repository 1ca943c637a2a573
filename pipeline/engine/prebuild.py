"""Build the just-in-time CPU extensions once, at install time.

On the CPU accelerator DeepSpeed compiles a shared-memory collective op into
~/.cache/torch_extensions the first time a process group starts, and the methods' fused CPU
kernels (pipeline/methods/csrc) compile the first time they run. Ranks
that start together race for the lock of such a build, and a process killed while holding it
leaves a lock that makes every later run wait forever; building them here, in one process,
keeps training runs away from the compiler.
"""
import os

if __name__ == "__main__":
    import torch

    if not torch.cuda.is_available():
        from pipeline.methods.extensions import build_all

        build_all()
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            builder.load(verbose=False)
