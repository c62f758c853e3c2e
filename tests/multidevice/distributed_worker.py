"""One process of the two-process finetuning test (tests/multidevice/test_distributed.py).

    python distributed_worker.py PROCESS_ID PORT OUT_DIR
    python distributed_worker.py PROCESS_ID PORT cli APIQ_JAX_FINETUNE_ARGS...

Starts ``jax.distributed`` on localhost with 2 processes (4 CPU devices each), finetunes
the model of :mod:`tests.multidevice.test_distributed` on a ``data=4,fsdp=2`` mesh spanning
both, with orbax checkpoints in ``OUT_DIR/ckpt``; process 0 writes the gathered LoRA and
the losses to ``OUT_DIR/result.npz``. With ``cli`` it runs ``apiq-jax`` with the given
arguments plus the three multi-process flags instead (exit status = the command's).
"""

from __future__ import annotations

import sys

import jax


def main(process_id: int, port: int, out: str) -> None:
    from apiq_jax import sharding as S

    S.initialize_distributed(f"localhost:{port}", 2, process_id)
    import numpy as np

    from apiq_jax.training import finetune
    from tests.multidevice.test_distributed import FINETUNE, model

    frozen, lora, ids, cfg = model()
    assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.device_count())
    trained, losses = finetune(frozen, lora, ids, cfg, FINETUNE, progress=False, mesh=S.make_mesh("data=4,fsdp=2"),
                               checkpoint_dir=f"{out}/ckpt")
    leaves = jax.tree.leaves(S.to_host(trained))
    if jax.process_index() == 0:
        np.savez(f"{out}/result.npz", losses=np.asarray(losses), **{f"leaf{i}": x for i, x in enumerate(leaves)})


if __name__ == "__main__":
    if sys.argv[3] == "cli":
        from apiq_jax.cli import main as cli_main

        sys.exit(cli_main([*sys.argv[4:], "--coordinator", f"localhost:{sys.argv[2]}", "--num-processes", "2",
                           "--process-id", sys.argv[1]]))
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
