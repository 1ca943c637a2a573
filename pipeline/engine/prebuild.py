"""Build the methods' just-in-time CPU extensions once, at install time.

The fused CPU kernels (pipeline/methods/csrc) compile the first time they run. Ranks that start
together race for the lock of such a build, and a process killed while holding it leaves a
lock that makes every later run wait forever; building them here, in one process, keeps
training runs away from the compiler. (DeepSpeed's own CPU collective op is not used: see
``distributed._skip_shm_comm_op``.)
"""

if __name__ == "__main__":
    import torch

    if not torch.cuda.is_available():
        from pipeline.methods.extensions import build_all

        build_all()
