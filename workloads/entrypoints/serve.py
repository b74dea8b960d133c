"""Start Triton for the run's model repository: the main container of the serving pod (Triton TRT-LLM image).

    python3 /opt/nemo-eks/serve.py --config /etc/nemo-eks/run.json [--print]

Ports: HTTP 8000, gRPC 8001, metrics 8002. The command is the one TensorRT-LLM's
``triton_backend/scripts/launch_triton_server.py`` builds, produced here so that the pod's main process IS
tritonserver (or mpirun): signals, exit codes and restarts reach it directly, where the launcher script starts
it in the background and exits. Stdlib only.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import layout  # noqa: E402  (the entrypoints directory is flat in the pod)

TRITONSERVER = "/opt/tritonserver/bin/tritonserver"
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
TRTLLM_MODEL = "tensorrt_llm"


def _server_args(repository: str) -> list[str]:
    return [f"--model-repository={repository}", f"--grpc-port={GRPC_PORT}", f"--http-port={HTTP_PORT}",
            f"--metrics-port={METRICS_PORT}"]


def engine_command(repository: str, world_size: int, tritonserver: str = TRITONSERVER) -> list[str]:
    """The C++ tensorrtllm backend runs one MPI rank per GPU of the engine (TP x PP): one tritonserver process
    per rank. Rank 0 serves every model; the other ranks load only tensorrt_llm (explicit model control) and
    stay inside the backend as executor workers, so they never open the ports they are given. Each rank gets its
    own Python-backend shared-memory prefix so the processes' stubs do not collide in /dev/shm."""
    if world_size == 1:
        # launch_triton_server.py --no-mpi: a single-GPU engine needs no MPI world.
        return [tritonserver, *_server_args(repository), "--disable-auto-complete-config",
                "--backend-config=python,shm-region-prefix-name=prefix0_"]
    # Open MPI binds each rank to one core when it starts two processes or fewer, and to one package when more
    # (mpirun(1), Open MPI 4.1 and 5.0: "mpirun automatically binds processes to hardware resources ... Bind to
    # core: when the number of processes is <= 2"). A rank is a whole tritonserver with its Python-backend
    # stubs and executor threads: pinned to one core they queue behind each other, so no binding at all.
    command = ["mpirun", "--allow-run-as-root", "--bind-to", "none"]
    for rank in range(world_size):
        command += ["-n", "1", tritonserver, *_server_args(repository)]
        if rank != 0:
            command += ["--model-control-mode=explicit", f"--load-model={TRTLLM_MODEL}"]
        command += ["--disable-auto-complete-config", f"--backend-config=python,shm-region-prefix-name=prefix{rank}_",
                    ":"]
    return command[:-1]  # mpirun's MPMD separator goes between rank blocks, not after the last


def llmapi_command(repository: str, tritonserver: str = TRITONSERVER) -> list[str]:
    """The llmapi (PyTorch) backend runs one Triton process; the LLM API inside it starts its own tensor- and
    pipeline-parallel workers. Auto-complete stays ON, unlike the launcher's default: the model's
    ``auto_complete_config`` is what applies model.yaml's ``triton_config`` (decoupled, max_batch_size) to the
    Triton config; with it off, streaming (decoupled) would not be enabled."""
    return [tritonserver, *_server_args(repository), "--backend-config=python,shm-region-prefix-name=prefix0_"]


def command_for(run: dict, tritonserver: str = TRITONSERVER) -> list[str]:
    serving, repository = run["serving"], run["paths"]["model_repository"]
    if serving["backend"] == "engine":
        if serving["world_size"] != serving["tp"] * serving["pp"]:
            raise ValueError(f"serving.world_size {serving['world_size']} != tp {serving['tp']} x pp {serving['pp']}: "
                             "the engine was built for TP x PP ranks and Triton must start exactly that many")
        return engine_command(repository, serving["world_size"], tritonserver)
    if serving["backend"] == "llmapi":
        return llmapi_command(repository, tritonserver)
    raise ValueError(f"serving.backend {serving['backend']!r}: expected 'engine' or 'llmapi'")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(layout.RUN_CONFIG_FILE))
    parser.add_argument("--tritonserver", default=TRITONSERVER)
    parser.add_argument("--print", action="store_true", help="print the command instead of running it")
    args = parser.parse_args(argv)
    run = layout.load_run(args.config)
    command = command_for(run, args.tritonserver)
    if args.print:
        print(shlex.join(command))
        return 0
    marker = run["paths"]["conversion_marker"]
    if not os.path.exists(marker):
        print(f"{marker} is missing: the model repository is not complete; refusing to serve a partial one",
              file=sys.stderr)
        return 1
    executable = shutil.which(command[0]) or command[0]
    print("exec " + shlex.join(command), flush=True)
    os.execv(executable, command)
    return 127  # unreachable: execv replaces the process


if __name__ == "__main__":
    sys.exit(main())
