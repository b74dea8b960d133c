"""Multi-node training over EFA, on the Kubernetes side: which image the training pods run, the NCCL network they
are pinned to, and the steps each training pod runs before torchrun: the EFA pre-flight check
(entrypoints/efa_check.py) and, once per run, the fabric test (entrypoints/fabric_test.py).

Where the fabric test runs, and why there: in the training pods themselves, as a torchrun of its own before the
training's torchrun. Those pods already hold every node of the run with all its GPUs and EFA interfaces (EFA is
exclusive to one pod per node), so a separate Job could only run before them or after them, on nodes the
autoscaler may have replaced by then; an MPIJob would need the MPI operator, which this cluster does not run,
and all_reduce_perf spans nodes only under MPI. The test measures the nodes, image, NCCL, plugin and environment
the training then uses. Pure functions: the manifests are built in training.py and pipeline.py."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any, Mapping

from infra import images
from infra.config import StackConfig
from workloads.entrypoints.layout import ENTRYPOINTS_DIR, RUN_CONFIG_FILE, RunPaths

FABRIC_MARKER = "FABRIC_TESTED"  # in the run's directory: the report of the test that passed


@dataclass(frozen=True)
class EfaPreflight:
    """What every training pod of a multi-node EFA run does before training."""

    efa_devices: int
    nodes: int
    gpus_per_node: int
    run_id: str
    instance_type: str
    fabric_test: bool
    min_bus_bandwidth_gbps: float
    fabric_marker: str

    def env(self) -> Mapping[str, str]:
        # Pinned: with NCCL_NET set, NCCL fails at init when the plugin cannot serve it, instead of falling back
        # to TCP sockets. The plugin file comes from the image (NCCL_NET_PLUGIN in images/training/Dockerfile).
        return {"NCCL_NET": images.NCCL_NET_NAME}

    def script(self) -> str:
        """Shell steps before the training's torchrun, each ending in `&&`: a failure stops the pod there."""
        check = (f"python3 {ENTRYPOINTS_DIR}/efa_check.py --config {RUN_CONFIG_FILE} "
                 f"--efa-devices {self.efa_devices} && ")
        if not self.fabric_test:
            return check
        marker = shlex.quote(self.fabric_marker)
        # A run tests its fabric once: a pod restarted mid-run must not wait in a rendezvous the others left.
        # Its own rendezvous id keeps it apart from the training's.
        fabric = (f"torchrun --nnodes={self.nodes} --nproc-per-node={self.gpus_per_node} --rdzv-backend=c10d "
                  f"--rdzv-endpoint=${{MASTER_ADDR}}:${{MASTER_PORT}} --rdzv-id={self.run_id}-fabric "
                  f"{ENTRYPOINTS_DIR}/fabric_test.py --config {RUN_CONFIG_FILE} "
                  f"--min-busbw {self.min_bus_bandwidth_gbps} --instance-type {self.instance_type} --marker {marker}")
        return f"{check}{{ [ -f {marker} ] || {fabric}; }} && "


def fabric_marker(paths: RunPaths) -> str:
    return str(paths.run_dir / FABRIC_MARKER)


def preflight(cfg: StackConfig, paths: RunPaths, run_id: str) -> EfaPreflight | None:
    """None for a single-node run or a type without EFA: NCCL stays on NVLink there and needs no network."""
    efa = cfg.pipeline.efa
    if not efa.multi_node:
        return None
    instance = cfg.sizing.request.instance
    return EfaPreflight(efa_devices=efa.efa_devices, nodes=cfg.sizing.parallelism.nodes,
                        gpus_per_node=instance.gpus, run_id=run_id, instance_type=instance.name,
                        fabric_test=efa.fabric_test, min_bus_bandwidth_gbps=efa.min_bus_bandwidth_gbps,
                        fabric_marker=fabric_marker(paths))


def training_image(cfg: StackConfig, built: Any = None) -> Any:
    """The training pods' image: images.training when set; for a multi-node EFA run the project's image in the
    stack's ECR repository (``built``: its reference, an Output under Pulumi); otherwise the stock NeMo image."""
    efa = cfg.pipeline.efa
    if efa.training_image:
        return efa.training_image
    if efa.built_image_tag:
        if built is not None:
            return built
        return f"<{images.training_repository_name(cfg.prefix)} repository URL>:{efa.built_image_tag}"
    return cfg.pipeline.nemo_image
