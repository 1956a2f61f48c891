"""A stand-in for the CUDA graph capture, so that the engine's side of --cuda-graphs runs on the CPU: recording runs
nothing (as a CUDA capture runs no kernel) and returns outputs that each replay overwrites in place, by running the
update again; the CPU counts as a CUDA device. Used by tests/test_graphs.py, in its own process and in the processes
`accelerate launch` starts (`python -m tests.stand_in ARGS` is `flame ARGS` with the stand-in; with STAND_IN_FAILS=R
the capture of the process of rank R fails, as a CUDA capture does when the update reads a value back)."""

import os

import torch

from flame import graphs


class Recorded:
    """What the stand-in capture saw."""

    def __init__(self):
        self.captures, self.grads_at_capture = 0, []


def install(setattr_=setattr, fails: bool = False) -> Recorded:
    """Put the stand-in in place with `setattr_` (pytest's monkeypatch.setattr undoes it after the test); with
    `fails` each capture fails instead."""
    seen = Recorded()
    unsupported = graphs.unsupported

    def record(self, body):
        if fails:
            raise RuntimeError("operation not permitted when stream is capturing")
        seen.captures += 1
        seen.grads_at_capture = [p.grad for group in self.optimizer.param_groups for p in group["params"]]
        outputs = (torch.full((), float("nan")), torch.full((), float("nan")))

        def replay():
            for static, value in zip(outputs, body(), strict=True):
                static.copy_(value)

        return replay, outputs

    setattr_(graphs.GraphedUpdate, "_record", record)
    setattr_(graphs, "unsupported", lambda device, *a: unsupported(torch.device("cuda"), *a))
    return seen


if __name__ == "__main__":
    from flame.cli.app import main

    install(fails=os.environ.get("STAND_IN_FAILS") == os.environ.get("RANK", "0"))
    main()
