"""The stack configuration as typed, frozen objects, and ALL of its validation.

Every key the program reads is declared once in ``KEYS`` (name, type, default, allowed values, meaning).
The loader reads values through that table, docs/configuration.md's table is generated from it
(``make docs``), and a key that is not in it is rejected as a likely typo. A bad value
raises ``ConfigError`` naming the key, the value and what is allowed, before any resource is declared.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from infra import catalog, images, sizing

PROJECT = "nemo-eks"
REQUIRED = object()  # sentinel default: the key must be set


class Derived(str):
    """A default computed from other keys or the sizing plan; the text says from what (for the docs)."""


def show_value(value: Any) -> str:
    """A value as the person wrote it: YAML's spelling for the numbers JSON has no word for."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return repr(value) if isinstance(value, str) else json.dumps(value)


class ConfigError(ValueError):
    """A stack-config value that cannot work. The message is written for the person editing the stack file."""

    def __init__(self, key: str, value: Any, allowed: str, hint: str = ""):
        self.key, self.value, self.allowed, self.hint = key, value, allowed, hint
        super().__init__(self.render(f"stack config '{key}'"))

    def render(self, subject: str) -> str:
        """The message about ``subject`` (a stack-config key, or the command-line flag it stands for)."""
        message = f"{subject}: {show_value(self.value)} is not valid; allowed: {self.allowed}"
        return message + (f". {self.hint}" if self.hint else "")


@dataclass(frozen=True)
class Key:
    """One documented configuration key. ``path`` uses ``[]`` for list items, e.g. ``gpuNodeGroups[].name``."""

    path: str
    type: str
    default: Any
    allowed: str
    description: str

    @property
    def qualified(self) -> str:
        return self.path if ":" in self.path.split(".")[0] else f"{PROJECT}:{self.path}"


LOG_TYPES = ("api", "audit", "authenticator", "controllerManager", "scheduler")
CAPACITY_TYPES = ("ON_DEMAND", "SPOT", "CAPACITY_BLOCK")
MONITORING_STACKS = ("kube-prometheus-stack", "existing", "none")
NAT_MODES = ("single", "perAz")
FSX_THROUGHPUTS_MB_PER_TIB = (125, 250, 500, 1000)  # PERSISTENT_2 SSD, FSx Lustre guide "Throughput capacity"
# FSx API CreateFileSystemLustreMetadataConfiguration: Mode AUTOMATIC | USER_PROVISIONED; Iops (USER_PROVISIONED
# only) for SSD file systems 1500, 3000, 6000, 12000 and multiples of 12000 up to 192000.
FSX_METADATA_MODES = ("AUTOMATIC", "USER_PROVISIONED")
FSX_METADATA_IOPS = (1500, 3000, 6000, *range(12000, 192001, 12000))
MIN_KUBERNETES_MINOR = 31
# The newest Cluster Autoscaler release of each Kubernetes minor (release tags cluster-autoscaler-1.NN.P of
# github.com/kubernetes/autoscaler, as of 2026-07-22; images registry.k8s.io/autoscaling/cluster-autoscaler:v1.NN.P).
# The autoscaler's minor must match the cluster's: it simulates the scheduler of its own minor, and its README
# (cluster-autoscaler/README.md, "Releases", at cluster-autoscaler-1.34.5) supports only that pairing; chart 9.59.0's
# README lists charts 9.38.0+ for 1.31 up to 9.51.0+ for 1.34.
CLUSTER_AUTOSCALER_RELEASES: Mapping[int, str] = MappingProxyType({
    31: "v1.31.5", 32: "v1.32.7", 33: "v1.33.6", 34: "v1.34.5", 35: "v1.35.2"})

KEYS: tuple[Key, ...] = (
    Key("aws:region", "string", REQUIRED, "an AWS region name, e.g. us-east-1", "Region of every resource (the AWS provider's own key)."),
    Key("kubernetesVersion", "string", "1.34", f"1.{MIN_KUBERNETES_MINOR} or newer, as `1.NN`", "EKS control-plane version; GPU nodes follow it."),
    Key("namespace", "string", "nemo", "a DNS-1123 label", "Namespace of the pipeline's workloads, service accounts and FSx claim."),
    Key("tags", "map<string,string>", {}, "string keys and values", "Extra tags on every AWS resource (the project and stack tags are always set)."),
    Key("network.vpcCidr", "string", "10.0.0.0/16", "an IPv4 CIDR from /16 to /20", "CIDR of the new VPC; private subnets get a quarter each, public subnets a sixteenth."),
    Key("network.availabilityZones", "list<string>", Derived("<region>a, b, c"), "2 or 3 zone names of the region", "Zones of the new VPC's subnets."),
    Key("network.natGateways", "string", "single", "single, perAz", "One NAT gateway for the VPC, or one per zone (survives the loss of a zone)."),
    Key("network.existingVpcId", "string", None, "vpc-…", "Use this VPC instead of creating one; then both subnet maps below are required."),
    Key("network.existingPrivateSubnetIds", "map<string,string>", None, "zone name -> subnet-…", "Private subnets of the existing VPC, by zone: nodes, FSx."),
    Key("network.existingPublicSubnetIds", "map<string,string>", None, "zone name -> subnet-…", "Public subnets of the existing VPC, by zone: internet-facing load balancers."),
    Key("cluster.adminPrincipalArns", "list<string>", [], "IAM role or user ARNs", "Principals given cluster-admin through EKS access entries (the identity running `pulumi up` is admin too)."),
    Key("cluster.publicEndpoint", "boolean", False, "true, false", "Also expose the Kubernetes API publicly (the private endpoint is always on)."),
    Key("cluster.publicAccessCidrs", "list<string>", [], "IPv4 CIDRs; required when publicEndpoint is true", "Who may reach the public endpoint."),
    Key("cluster.logTypes", "list<string>", list(LOG_TYPES), ", ".join(LOG_TYPES), "Control-plane log types sent to CloudWatch."),
    Key("systemNodes.instanceType", "string", catalog.SYSTEM_INSTANCE_TYPE, ", ".join(catalog.SYSTEM_INSTANCE_TYPES), "CPU node type for add-ons and operators."),
    Key("systemNodes.minSize", "integer", 2, ">= 1", "Smallest size of the system node group."),
    Key("systemNodes.desiredSize", "integer", 2, "minSize..maxSize", "Size of the system node group."),
    Key("systemNodes.maxSize", "integer", 4, ">= desiredSize", "Largest size of the system node group."),
    Key("gpuNodeGroups", "list<object>", REQUIRED, "at least one group", "GPU node groups, one managed node group each."),
    Key("gpuNodeGroups[].name", "string", REQUIRED, "lower-case letters, digits, '-'; at most 20; unique", "Short name of the group, used in resource names and the node label."),
    Key("gpuNodeGroups[].instanceType", "string", REQUIRED, ", ".join(catalog.GPU_INSTANCE_TYPES), "GPU instance type."),
    Key("gpuNodeGroups[].availabilityZone", "string", Derived("first zone"), "one of the network's zones", "The group's one zone (EFA and the cluster placement group need one zone)."),
    Key("gpuNodeGroups[].minSize", "integer", 0, ">= 0", "Smallest size; 0 lets the group cost nothing while idle."),
    Key("gpuNodeGroups[].desiredSize", "integer", 0, "minSize..maxSize; 0, or at least the nodes its stages need", "Size of the group when it is created. With autoscaling on, the Cluster Autoscaler owns the size afterwards and Pulumi ignores changes to it; with autoscaling.enabled false, the size of the group now (0 while idle)."),
    Key("gpuNodeGroups[].maxSize", "integer", Derived("from the sizing plan"), ">= what the stages on the group need, planned", "Largest size. Default: the training nodes plus the serving nodes the plan puts on the group, so a new run never waits for the serving node."),
    Key("gpuNodeGroups[].capacityType", "string", "ON_DEMAND", ", ".join(CAPACITY_TYPES), "How the instances are bought."),
    Key("gpuNodeGroups[].capacityReservationId", "string", None, "cr-…; required for CAPACITY_BLOCK, optional for ON_DEMAND, not for SPOT", "Capacity Block or On-Demand Capacity Reservation to launch into (no placement group is then created)."),
    Key("gpuNodeGroups[].rootVolumeGib", "integer", 200, "50..16384", "Root EBS volume (gp3, encrypted); images and pod data use the RAID0 of the instance-store NVMe."),
    Key("gpuNodeGroups[].scaleDownAfterMinutes", "integer", Derived("5; 15 for prod stacks"), "1..1440", "How long a node of the group may run nothing but DaemonSets before the Cluster Autoscaler removes it."),
    Key("gpuNodeGroups[].amiReleaseVersion", "string", None, "an EKS AL2023 NVIDIA AMI release, e.g. 1.34.1-20251120", "Pin the node AMI release; unset follows the latest for the Kubernetes version."),
    Key("storage.fsxStorageCapacityGib", "integer", Derived("from the sizing plan"), "1200, 2400, then multiples of 2400; at least the plan's need", "FSx for Lustre PERSISTENT_2 capacity (dataset, base model, kept checkpoints, exports)."),
    Key("storage.fsxThroughputPerTib", "integer", Derived("from the sizing plan"), ", ".join(map(str, FSX_THROUGHPUTS_MB_PER_TIB)), "FSx throughput per TiB of capacity (MB/s/TiB); the plan sizes it to write a checkpoint in about ten minutes."),
    Key("storage.fsxAvailabilityZone", "string", Derived("first GPU group's zone"), "one of the network's zones", "Zone of the file system; put it next to the GPU nodes."),
    Key("storage.fsxMetadataMode", "string", "AUTOMATIC", ", ".join(FSX_METADATA_MODES), "Metadata performance of the file system: AUTOMATIC scales metadata IOPS with capacity, USER_PROVISIONED takes fsxMetadataIops. Declared when the file system is created: one created without it cannot raise its metadata performance later."),
    Key("storage.fsxMetadataIops", "integer", None, "1500, 3000, 6000, or 12000..192000 in steps of 12000; only with USER_PROVISIONED", "Metadata IOPS of a USER_PROVISIONED file system (can be raised later, lowering it replaces the file system)."),
    Key("storage.noncurrentVersionDays", "integer", 30, "1..3650", "Days old versions of checkpoints and models are kept in S3."),
    Key("storage.abortIncompleteUploadDays", "integer", 7, "1..365", "Days before unfinished multipart uploads are removed."),
    Key("storage.protect", "boolean", Derived("true for prod stacks"), "true, false", "Protect buckets and the file system from deletion and retain them when the stack is destroyed."),
    Key("model.variant", "string", "7b", ", ".join(sizing.VARIANTS), "Model-size variant; everything else is sized from it."),
    Key("model.preset", "string", Derived("the variant's default"), "; ".join(f"{v}: {', '.join(m)}" for v, m in sizing.VARIANTS.items()), "Concrete model of the variant (architecture facts in infra/sizing.py)."),
    Key("model.hfModelId", "string", Derived("the preset's Hugging Face id"), "<org>/<name> of a model with the preset's architecture", "Hugging Face model that is fine-tuned, e.g. a chat fine-tune of the preset."),
    Key("training.method", "string", "lora", ", ".join(sizing.METHODS), "LoRA adapters on a frozen base, or full supervised fine-tuning."),
    Key("training.precision", "string", "bf16", "bf16; fp8 on Hopper (p5*) only", "Training precision."),
    Key("training.seqLength", "integer", 4096, "128..the model's maximum", "Training sequence length (tokens)."),
    Key("training.microBatchSize", "integer", 1, "1..64", "Sequences per GPU per step."),
    Key("training.globalBatchSize", "integer", 128, "a multiple of microBatchSize x data-parallel size", "Sequences per optimizer step."),
    Key("training.loraRank", "integer", sizing.DEFAULT_LORA_RANK, "1..512", "LoRA rank (method lora)."),
    Key("training.datasetTokens", "integer", None, ">= 1", "Training-set size in tokens: sizes FSx and gives time and cost to train."),
    Key("training.epochs", "number", 1, "> 0", "Passes over the training set."),
    Key("training.nodes", "integer", Derived("planned"), f"1..{sizing.MAX_NODES}, a count that fits", "Fix the number of training nodes; unset lets the planner choose the fewest that fit."),
    Key("training.tp", "integer", Derived("planned"), "1, 2, 4, 8 dividing the attention and KV heads", "Fix tensor parallelism."),
    Key("training.pp", "integer", Derived("planned"), "a count that splits the layers evenly", "Fix pipeline parallelism."),
    Key("training.vp", "integer", Derived("planned"), "1, or > 1 with PP > 1, dividing each stage's layers, micro-batches per step a multiple of PP", "Fix virtual pipeline (interleaved) stages per pipeline rank (NeMo's virtual_pipeline_model_parallel_size); 1 turns interleaving off."),
    Key("training.nodeGroup", "string", Derived("the first GPU group"), "a gpuNodeGroups name", "GPU node group the training job runs on; its instance type is the plan's."),
    Key("serving.tp", "integer", Derived("planned"), "1, 2, 4, 8 within one node, fitting the engine", "Fix the engine's and Triton's tensor parallelism."),
    Key("serving.maxSeqLength", "integer", Derived("training.seqLength"), "128..the model's maximum", "Longest sequence (prompt plus output) the engine serves."),
    Key("serving.nodeGroup", "string", Derived("the training group"), "a gpuNodeGroups name", "GPU node group Triton runs on."),
    Key("training.maxSteps", "integer", Derived("datasetTokens x epochs / (globalBatchSize x seqLength), else 1000"), ">= 1", "Optimizer steps of the run."),
    Key("training.learningRate", "number", Derived("1e-4 for LoRA, 5e-6 for SFT (NeMo's fine-tuning recipes)"), "> 0 and < 1", "Peak learning rate (cosine schedule with warm-up)."),
    Key("data.dataset", "string", "default", "a name of letters, digits, '.', '_', '-'", "Dataset directory in the datasets bucket (train.jsonl, optional validation.jsonl); a new name starts a new run."),
    Key("images.nemo", "string", images.DEFAULT_NEMO_IMAGE, "a NeMo Framework image pinned by tag, " + ", ".join(images.NEMO_CONTAINERS), "Image of the fine-tuning, export and evaluation pods."),
    Key("images.triton", "string", images.DEFAULT_TRITON_IMAGE, "a Triton <yy.mm>-trtllm-python-py3 image pinned by tag; <= 26.07 for the engine backend", "Image that builds the engine and serves it (the same tag for both, by construction)."),
    Key("ngcApiKey", "string", None, "a Pulumi secret (`pulumi config set --secret nemo-eks:ngcApiKey ...`)", "NGC API key: creates the nvcr.io pull secret every NGC pod uses. Unset: the nodes pull anonymously."),
    Key("hfToken", "string", None, "a Pulumi secret (`pulumi config set --secret nemo-eks:hfToken ...`)", "Hugging Face token for gated base models such as Llama: a Kubernetes secret the preparing pod reads."),
    Key("serving.backend", "string", "engine", ", ".join(images.BACKENDS), "engine: TensorRT-LLM engine built by the conversion Job; llmapi: TensorRT-LLM's PyTorch backend on the exported checkpoint."),
    Key("serving.minReplicas", "integer", 1, ">= 1", "Fewest Triton replicas."),
    Key("serving.maxReplicas", "integer", 2, ">= minReplicas", "Most Triton replicas the autoscaler may run; the GPU group is sized for them."),
    Key("serving.targetQueueTimeMs", "integer", 100, "1..60000", "Average Triton queue time per request the autoscaler keeps to."),
    Key("evaluation.enabled", "boolean", True, "true, false", "Evaluate the base and the fine-tuned model between training and conversion, and gate the rest on it."),
    Key("evaluation.minLossImprovementPercent", "number", 0, "-100..100", "Gate: the fine-tuned validation loss must be at least this many percent below the base model's."),
    Key("evaluation.maxExactMatchDrop", "number", 0, "0..100", "Gate: exact-match may drop at most this many percentage points below the base model's."),
    Key("evaluation.lossSamples", "integer", 256, "1..100000", "Validation examples the loss and perplexity are computed on."),
    Key("evaluation.generationSamples", "integer", 64, "1..10000", "Validation examples answered by generation (exact match, ROUGE-L, samples in the report)."),
    Key("evaluation.maxNewTokens", "integer", 256, "1..8192", "Longest generated answer."),
    Key("evaluation.metricsLingerSeconds", "integer", 600, "0..86400", "How long the finished evaluation keeps serving its metrics for Prometheus to scrape."),
    Key("pipeline.enabled", "boolean", True, "true, false", "Declare the training, conversion and serving workloads (false: the platform only)."),
    Key("pipeline.waitForCompletion", "boolean", False, "true, false", "Make `pulumi up` wait for training and conversion to finish (short dev runs, CI)."),
    Key("pipeline.timeoutMinutes", "integer", 720, "10..10080", "How long `pulumi up` waits for a stage when waitForCompletion is on."),
    # Fault tolerance of the training run (workloads/training.py and docs/pipeline.md say what each fault costs).
    Key("faultTolerance.workerRestarts", "integer", 10, "0..1000", "Times torchrun restarts a node's ranks in place (a crashed rank, a collective that timed out, a node that left the rendezvous) before its container fails."),
    Key("faultTolerance.podRestarts", "integer", 3, "0..100", "Container-level faults the training run survives (a restarted container, the loss of the master's node); the PyTorchJob's backoffLimit is this x nodes + 1, because the training operator sums the restarts of all pods."),
    Key("faultTolerance.ncclTimeoutSeconds", "integer", 1800, "60..7200", "A collective that does not complete within this fails its rank (a hung rank ends in bounded time); keep it above the longest checkpoint save."),
    Key("faultTolerance.rendezvousTimeoutSeconds", "integer", 1800, "60..7200", "How long torchrun waits for every node to join (at the start, after a restart, for a replacement node); keep it above the time a new GPU node takes to join the cluster."),
    Key("monitoring.stack", "string", "kube-prometheus-stack", ", ".join(MONITORING_STACKS), "kube-prometheus-stack: install it (Prometheus, Alertmanager, Grafana) with the DCGM exporter and prometheus-adapter; existing: a Prometheus with the prometheus-operator CRDs is already in the cluster (give its URL); none: no metrics stack, monitors or alerts."),
    Key("monitoring.prometheusUrl", "string", Derived("the installed stack's Prometheus"), "http(s)://host[:port][/path]", "Prometheus that prometheus-adapter queries for the autoscaler's metric (required with stack: existing)."),
    # Chart pins, each checked against its publisher on 2026-12-06: kube-prometheus-stack 85.1.2 and
    # prometheus-adapter 5.3.0 are chart-releaser release tags of prometheus-community/helm-charts
    # (kube-prometheus-stack-85.1.2, 2026-05-16; prometheus-adapter-5.3.0, 2026-02-19); dcgm-exporter 4.8.2 is
    # the newest entry of https://nvidia.github.io/dcgm-exporter/helm-charts/index.yaml (generated 2026-05-05;
    # 4.8.3 is not in it).
    Key("monitoring.kubePrometheusStackVersion", "string", "85.1.2", "a chart version of kube-prometheus-stack", "kube-prometheus-stack Helm chart version."),
    Key("monitoring.dcgmExporterVersion", "string", "4.8.2", "a chart version of dcgm-exporter", "NVIDIA DCGM exporter Helm chart version (GPU metrics)."),
    Key("monitoring.prometheusAdapterVersion", "string", "5.3.0", "a chart version of prometheus-adapter", "prometheus-adapter Helm chart version (Triton's queue time for the autoscaler)."),
    Key("monitoring.throughputDropFraction", "number", 0.3, "0.05..0.95", "Alert when training throughput falls this fraction below its 6-hour average."),
    Key("monitoring.lossWindowMinutes", "integer", 60, "15..1440", "Alert when the training loss has not fallen over this window."),
    Key("monitoring.tritonQueueTimeMs", "integer", 500, "1..600000", "Alert when Triton's average queue time per request exceeds this."),
    Key("monitoring.pendingGpuPodMinutes", "integer", 15, "1..1440", "Alert when a pod that asks for GPUs has waited this long for a node (no capacity, a quota, a Capacity Block not active yet)."),
    Key("monitoring.tritonFailureRatio", "number", 0.01, "0..1", "Alert when this share of Triton requests fail."),
    Key("autoscaling.enabled", "boolean", True, "true, false", "Run the Kubernetes Cluster Autoscaler on the system nodes: GPU groups grow from 0 for pending pods and shrink when idle. false: each group keeps its desiredSize, for clusters whose capacity is fixed."),
    Key("autoscaling.chartVersion", "string", "9.59.0", "a chart version of cluster-autoscaler (https://kubernetes.github.io/autoscaler)", "cluster-autoscaler Helm chart version."),
    Key("autoscaling.imageTag", "string", Derived("the newest release of the cluster's minor, e.g. v1.34.5 for 1.34"), "v1.<the kubernetesVersion minor>.<patch>", "Cluster Autoscaler image tag (registry.k8s.io/autoscaling/cluster-autoscaler); its minor must be the cluster's."),
    # Multi-node training over EFA: the project's EFA image, the pre-flight check and the fabric test (docs/efa.md).
    Key("images.training", "string", Derived("multi-node EFA runs: the image built from images/training in this stack's ECR repository, tagged with the NeMo tag and the EFA installer version (e.g. 26.02-efa1.50.0); otherwise images.nemo"), "an image pinned by tag, built from images/training/Dockerfile or equivalent", "Image of the training pods. Multi-node runs need NCCL over EFA, which the stock NeMo image cannot load."),
    Key("efa.fabricTest", "boolean", True, "true, false", "Multi-node runs: measure all-reduce bus bandwidth across the run's nodes before training; stop the run when it is below the floor."),
    Key("efa.minBusBandwidthGBps", "number", Derived("the instance type's floor, infra/catalog.py FABRIC_FLOORS"), "> 0", "Floor of the fabric test: all-reduce bus bandwidth (GB/s, nccl-tests' busbw) at 1 GiB and larger messages."),
    # nvidia-device-plugin 0.20.0: an entry of https://nvidia.github.io/k8s-device-plugin/index.yaml (generated
    # 2026-08-20); aws-efa-k8s-device-plugin v0.5.30 (app v0.5.20): the newest entry of
    # https://aws.github.io/eks-charts/index.yaml (generated 2026-08-03; v0.5.31 is not in it). Read 2026-12-06.
    Key("addons.nvidiaDevicePluginVersion", "string", "0.20.0", "a chart version of nvidia-device-plugin", "NVIDIA device plugin Helm chart version."),
    Key("addons.efaDevicePluginVersion", "string", "v0.5.30", "a chart version of aws-efa-k8s-device-plugin", "AWS EFA device plugin Helm chart version."),
    Key("addons.podIdentityAgentVersion", "string", None, "an EKS add-on version", "eks-pod-identity-agent add-on version; unset takes EKS's default for the cluster version."),
    Key("addons.fsxCsiDriverVersion", "string", None, "an EKS add-on version", "aws-fsx-csi-driver add-on version; unset takes EKS's default for the cluster version."),
    # CI runners: Actions Runner Controller scale sets inside the cluster (docs/delivery.md).
    Key("ciRunners.enabled", "boolean", False, "true, false", "Run the stack's CI previews and ups on runner pods inside the cluster (Actions Runner Controller), which reach the private API endpoint."),
    Key("ciRunners.githubConfigUrl", "string", None, "https://github.com/<owner>/<repository>; required while enabled", "The one repository whose workflows may use the runners (required while ciRunners.enabled)."),
    Key("ciRunners.controllerChartVersion", "string", "0.14.2", "a chart version of gha-runner-scale-set-controller", "Actions Runner Controller Helm chart version."),
    Key("ciRunners.scaleSetChartVersion", "string", "0.14.2", "a chart version of gha-runner-scale-set, equal to the controller's", "Runner scale set Helm chart version (the controller deletes scale sets of another version)."),
    Key("ciRunners.runnerImage", "string", "ghcr.io/actions/actions-runner:2.334.0", "an image pinned by tag, never latest", "Image of the runner pods."),
    Key("ciRunners.maxRunners", "integer", 2, "1..10", "Most concurrent runners per scale set (previews and ups of one stack are serialised by concurrency groups anyway)."),
    Key("ciRunners.instanceType", "string", "m7i.xlarge", "a CPU instance type of infra/catalog.py", "Instance type of the runners' own node group (no GPU)."),
    Key("ciRunners.nodes", "integer", 1, "1..4", "Nodes of the runners' own node group (fixed size: nothing scales it in under a running job)."),
    Key("githubAppId", "string", None, "a Pulumi secret (`pulumi config set --secret nemo-eks:githubAppId ...`)", "GitHub App id (or client id) the runner scale sets register with; all three githubApp* keys together."),
    Key("githubAppInstallationId", "string", None, "a Pulumi secret (`pulumi config set --secret nemo-eks:githubAppInstallationId ...`)", "Installation id of that App on the repository."),
    Key("githubAppPrivateKey", "string", None, "a Pulumi secret (`pulumi config set --secret nemo-eks:githubAppPrivateKey < app.pem`)", "PEM private key of that App. Unset (all three): the runner platform is created, the scale sets are not (bootstrap)."),
)
_KEYS_BY_PATH = MappingProxyType({k.path: k for k in KEYS})


# --------------------------------------------------------------------------------------------------
# Typed configuration


@dataclass(frozen=True)
class NetworkConfig:
    vpc_cidr: str
    availability_zones: tuple[str, ...]
    nat_gateways: str
    existing_vpc_id: str | None
    existing_private_subnet_ids: Mapping[str, str]
    existing_public_subnet_ids: Mapping[str, str]

    @property
    def uses_existing_vpc(self) -> bool:
        return self.existing_vpc_id is not None


@dataclass(frozen=True)
class ClusterConfig:
    kubernetes_version: str
    admin_principal_arns: tuple[str, ...]
    public_endpoint: bool
    public_access_cidrs: tuple[str, ...]
    log_types: tuple[str, ...]


@dataclass(frozen=True)
class SystemNodesConfig:
    instance_type: str
    min_size: int
    desired_size: int
    max_size: int


@dataclass(frozen=True)
class GpuNodeGroupConfig:
    name: str
    instance_type: str
    availability_zone: str
    min_size: int
    desired_size: int
    max_size: int
    capacity_type: str
    capacity_reservation_id: str | None
    root_volume_gib: int
    ami_release_version: str | None
    scale_down_after_minutes: int = 5

    @property
    def instance(self) -> catalog.InstanceType:
        return catalog.get(self.instance_type)

    @property
    def uses_reservation(self) -> bool:
        return self.capacity_reservation_id is not None

    @property
    def uses_placement_group(self) -> bool:
        # A forced cluster placement group can make reserved capacity unusable (the reservation was not
        # made in that group); with a reservation, AWS already decides the placement.
        return not self.uses_reservation


@dataclass(frozen=True)
class StorageConfig:
    fsx_storage_capacity_gib: int
    fsx_throughput_per_tib: int
    fsx_availability_zone: str
    noncurrent_version_days: int
    abort_incomplete_upload_days: int
    protect: bool
    fsx_metadata_mode: str = "AUTOMATIC"
    fsx_metadata_iops: int | None = None


@dataclass(frozen=True)
class AddonsConfig:
    nvidia_device_plugin_version: str
    efa_device_plugin_version: str
    pod_identity_agent_version: str | None
    fsx_csi_driver_version: str | None


@dataclass(frozen=True)
class AutoscalingConfig:
    """The Cluster Autoscaler: off keeps every GPU group at its declared desiredSize."""

    enabled: bool
    chart_version: str
    image_tag: str


@dataclass(frozen=True)
class GithubApp:
    """The GitHub App the scale sets register with. Values are Pulumi secrets: declared only as secrets."""

    app_id: str = field(repr=False)
    installation_id: str = field(repr=False)
    private_key: str = field(repr=False)


@dataclass(frozen=True)
class CiRunnersConfig:
    enabled: bool
    github_config_url: str | None
    controller_chart_version: str
    scale_set_chart_version: str
    runner_image: str
    max_runners: int
    instance_type: str
    nodes: int
    github_app: GithubApp | None  # None: platform only, no scale sets yet (bootstrap)


@dataclass(frozen=True)
class EvaluationConfig:
    enabled: bool
    min_loss_improvement_percent: float
    max_exact_match_drop: float
    loss_samples: int
    generation_samples: int
    max_new_tokens: int
    metrics_linger_seconds: int


@dataclass(frozen=True)
class MonitoringConfig:
    stack: str
    prometheus_url: str
    kube_prometheus_stack_version: str
    dcgm_exporter_version: str
    prometheus_adapter_version: str
    throughput_drop_fraction: float
    loss_window_minutes: int
    triton_queue_time_ms: int
    triton_failure_ratio: float
    pending_gpu_pod_minutes: int = 15

    @property
    def enabled(self) -> bool:
        """Monitors, rules and dashboards need the prometheus-operator CRDs: installed here or already there."""
        return self.stack != "none"


@dataclass(frozen=True)
class EfaConfig:
    """Multi-node training over EFA. ``multi_node``: training spans nodes of an EFA instance type, so NCCL must
    use the EFA plugin; then the pods check EFA before torchrun and, with ``fabric_test``, measure the fabric."""

    multi_node: bool = False
    efa_devices: int = 0  # per training pod (one pod per node, all of the node's EFA interfaces)
    training_image: str | None = None  # images.training when set explicitly
    built_image_tag: str | None = None  # the project-built image's tag, when the stack uses its ECR repository
    fabric_test: bool = False
    min_bus_bandwidth_gbps: float = 0.0


# Prometheus's Service from the kube-prometheus-stack release nemo-eks installs (release name = chart name).
INSTALLED_PROMETHEUS_URL = "http://kube-prometheus-stack-prometheus.monitoring.svc:9090"


@dataclass(frozen=True)
class FaultToleranceConfig:
    worker_restarts: int = 10
    pod_restarts: int = 3
    nccl_timeout_seconds: int = 1800
    rendezvous_timeout_seconds: int = 1800


@dataclass(frozen=True)
class PipelineConfig:
    enabled: bool
    dataset: str
    max_steps: int
    learning_rate: float
    nemo_image: str
    triton_image: str
    serving_backend: str
    min_replicas: int
    max_replicas: int
    target_queue_time_ms: int
    wait_for_completion: bool
    timeout_minutes: int
    monitoring: "MonitoringConfig"
    evaluation: EvaluationConfig | None = None
    ngc_api_key: str | None = field(default=None, repr=False)  # secrets: declared only as Pulumi secrets
    hf_token: str | None = field(default=None, repr=False)
    fault_tolerance: FaultToleranceConfig = FaultToleranceConfig()
    efa: EfaConfig = EfaConfig()


@dataclass(frozen=True)
class StackConfig:
    project: str
    stack: str
    region: str
    namespace: str
    tags: Mapping[str, str]
    network: NetworkConfig
    cluster: ClusterConfig
    system_nodes: SystemNodesConfig
    gpu_node_groups: tuple[GpuNodeGroupConfig, ...]
    storage: StorageConfig
    addons: AddonsConfig
    sizing: sizing.SizingPlan  # every size below the config comes from here
    hf_model_id: str
    training_node_group: str
    serving_node_group: str
    pipeline: PipelineConfig
    autoscaling: AutoscalingConfig = AutoscalingConfig(False, "", "")
    ci_runners: CiRunnersConfig | None = None  # None only for configs built by hand in tests

    @property
    def prefix(self) -> str:
        """Stem of every resource name: two stacks of the project never collide."""
        return f"{self.project}-{self.stack}"

    @property
    def is_prod(self) -> bool:
        return is_prod_stack(self.stack)


def is_prod_stack(stack: str) -> bool:
    return stack == "prod" or stack.startswith("prod-")


# --------------------------------------------------------------------------------------------------
# Reading raw values through the key table


@dataclass
class _Section:
    """A mapping being read, with the key path that locates it for error messages."""

    data: Mapping[str, Any]
    display: str  # e.g. "nemo-eks:gpuNodeGroups[1]"
    spec_prefix: str  # e.g. "gpuNodeGroups[]."
    read: set[str] = field(default_factory=set)

    def _spec(self, name: str) -> Key:
        return _KEYS_BY_PATH[self.spec_prefix + name]

    def where(self, name: str) -> str:
        return f"{self.display}.{name}" if self.display else self._spec(name).qualified

    def raw(self, name: str) -> Any:
        self.read.add(name)
        return self.data.get(name)

    def get(self, name: str, default: Any = None, *, convert: Callable[[str, Any], Any] | None = None) -> Any:
        spec = self._spec(name)
        value = self.raw(name)
        if value is None:
            if spec.default is REQUIRED:
                raise ConfigError(self.where(name), None, spec.allowed, "This key is required")
            if isinstance(spec.default, Derived):
                return default
            return default if default is not None else spec.default
        return (convert or _CONVERTERS[spec.type])(self.where(name), value, spec)

    def known(self) -> list[str]:
        """The names this mapping may hold: its keys and, at the top, the sections (``training``, ``model``...)."""
        rests = (p[len(self.spec_prefix):] for p in _KEYS_BY_PATH if p.startswith(self.spec_prefix) and ":" not in p)
        return sorted({rest.split(".")[0].split("[")[0] for rest in rests})

    def finish(self, names: Sequence[str] | None = None) -> None:
        """Reject keys the table does not know: a misspelt key would otherwise be silently ignored."""
        known = self.known()
        unknown = sorted(set(self.data) - self.read) if names is None else sorted(set(names) - set(known))
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{self.display or PROJECT}.{unknown[0]}".replace(f"{PROJECT}.", f"{PROJECT}:"),
                              unknown[0], "known keys: " + ", ".join(known), hint)


def _as_string(where: str, value: Any, spec: Key) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(where, value, spec.allowed)
    return str(value)


# The only numbers that may be negative: a gate that tolerates a worse loss. Everywhere else a negative count,
# size or duration is a typo, whatever range check follows.
_SIGNED_KEYS = frozenset({"evaluation.minLossImprovementPercent"})


def _not_negative(where: str, value: float, spec: Key) -> None:
    if value < 0 and spec.path not in _SIGNED_KEYS:
        raise ConfigError(where, value, spec.allowed, "Negative numbers have no meaning here")


def _as_integer(where: str, value: Any, spec: Key) -> int:
    if isinstance(value, bool):
        raise ConfigError(where, value, spec.allowed)
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        number = int(value)
    else:
        raise ConfigError(where, _as_shown_number(value), f"a whole number; {spec.allowed}")
    _not_negative(where, number, spec)
    return number


def _as_number(where: str, value: Any, spec: Key) -> float:
    if isinstance(value, bool):
        raise ConfigError(where, value, spec.allowed)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(where, value, f"a number; {spec.allowed}") from None
    if not math.isfinite(number):
        # YAML reads .inf and .nan as numbers; JSON (sizing.json, run.json) cannot even write them.
        raise ConfigError(where, number, f"a finite number; {spec.allowed}")
    _not_negative(where, number, spec)
    return number


def _as_shown_number(value: Any) -> Any:
    """``Infinity``/``NaN`` (how a YAML .inf reaches the program through JSON) shown as the number it was."""
    if isinstance(value, str) and value.strip() in ("Infinity", "-Infinity", "NaN"):
        return float(value.strip().replace("Infinity", "inf"))
    return value


def _as_boolean(where: str, value: Any, spec: Key) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(where, value, "true, false")


def _decode_json(where: str, value: Any, spec: Key) -> Any:
    # Pulumi hands structured values to the program as JSON strings.
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(where, value, f"a {spec.type}") from None
    return value


def _as_string_list(where: str, value: Any, spec: Key) -> tuple[str, ...]:
    value = _decode_json(where, value, spec)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(where, value, f"a list of strings; {spec.allowed}")
    return tuple(value)


def _as_string_map(where: str, value: Any, spec: Key) -> Mapping[str, str]:
    value = _decode_json(where, value, spec)
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(where, value, f"a map of strings; {spec.allowed}")
    return MappingProxyType(dict(value))


def _as_object_list(where: str, value: Any, spec: Key) -> list[Mapping[str, Any]]:
    value = _decode_json(where, value, spec)
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        raise ConfigError(where, value, f"a non-empty list of objects; {spec.allowed}")
    return value


_CONVERTERS: Mapping[str, Callable[[str, Any, Key], Any]] = {
    "string": _as_string,
    "integer": _as_integer,
    "number": _as_number,
    "boolean": _as_boolean,
    "list<string>": _as_string_list,
    "map<string,string>": _as_string_map,
    "list<object>": _as_object_list,
}


def _section(root: _Section, name: str) -> _Section:
    value = root.raw(name)
    where = root.where(name) if root.display else f"{PROJECT}:{name}"
    data = _decode_json(where, value, Key(name, "object", None, "", "")) if value is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(where, data, "an object with the keys listed in docs/configuration.md")
    return _Section(data, where, f"{name}.")


def _ipv4_network(where: str, value: str, allowed: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(value)
    except ValueError:
        try:
            network = ipaddress.IPv4Network(value, strict=False)
        except ValueError:
            raise ConfigError(where, value, allowed) from None
        raise ConfigError(where, value, allowed, f"Host bits are set: the network address is {network}") from None


def _check(condition: bool, where: str, value: Any, allowed: str, hint: str = "") -> None:
    if not condition:
        raise ConfigError(where, value, allowed, hint)


def _in(where: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        close = difflib.get_close_matches(value, list(allowed), n=1)
        raise ConfigError(where, value, ", ".join(allowed), f"Did you mean '{close[0]}'?" if close else "")
    return value


# --------------------------------------------------------------------------------------------------
# Loading

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_REGION = re.compile(r"[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d")
_RESERVATION = re.compile(r"cr-[0-9a-f]{8,17}")
_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:(role|user)/\S+")  # EKS access entries reject STS session ARNs
_STACK = re.compile(r"[a-z0-9]([a-z0-9-]{0,22}[a-z0-9])?")


def load(raw: Mapping[str, Any], stack: str, project: str = PROJECT, secret_keys: Sequence[str] = ()) -> StackConfig:
    """Build the typed config from raw key/value pairs (``nemo-eks:foo`` and ``aws:region`` keys);
    ``secret_keys`` names the keys Pulumi holds encrypted."""
    # The stack name is in bucket, role and node-group names, which AWS limits to 63-64 characters.
    _check(bool(_STACK.fullmatch(stack)), "stack name", stack, "lower-case letters, digits and '-', at most 24")
    for key in raw:
        check_config_key(key)
    root = _Section({k.split(":", 1)[1]: v for k, v in raw.items() if k.startswith(f"{PROJECT}:")}, "", "")
    # Unknown names first: a misspelt section (`modle`) would otherwise fall back to defaults and fail, or
    # pass, for a reason that has nothing to do with the typo.
    root.finish(names=list(root.data))
    region = _as_string("aws:region", raw.get("aws:region") or "", _KEYS_BY_PATH["aws:region"])
    _check(bool(_REGION.fullmatch(region)), "aws:region", region or None, _KEYS_BY_PATH["aws:region"].allowed,
           "Set it with `pulumi config set aws:region us-east-1`")

    version = root.get("kubernetesVersion")
    match = re.fullmatch(r"1\.(\d+)", version)
    # An unquoted 1.30 is the number 1.3 to YAML; the minor version lost its zero before it got here.
    misread = f"YAML reads an unquoted {version}0 as the number {version}: quote it, \"{version}0\"" \
        if re.fullmatch(r"1\.\d", version) else ""
    _check(bool(match) and int(match.group(1)) >= MIN_KUBERNETES_MINOR, root.where("kubernetesVersion"), version,
           _KEYS_BY_PATH["kubernetesVersion"].allowed, misread)

    namespace = root.get("namespace")
    _check(bool(_DNS_LABEL.fullmatch(namespace)) and len(namespace) <= 63, root.where("namespace"), namespace,
           "a DNS-1123 label: lower-case letters, digits and '-', at most 63")

    network = _load_network(_section(root, "network"), region)
    cluster = _load_cluster(_section(root, "cluster"), version)
    system_nodes = _load_system_nodes(_section(root, "systemNodes"))
    drafts = _load_gpu_node_groups(root, network, stack)
    workload = _load_model_and_plan(root, drafts)
    plan = workload.plan
    groups = _size_gpu_node_groups(drafts, workload)
    storage = _load_storage(_section(root, "storage"), network, groups, stack, plan)
    pipeline = _load_pipeline(root, workload, secret_keys)
    addons = _load_addons(_section(root, "addons"))
    autoscaling = _load_autoscaling(_section(root, "autoscaling"), version)
    ci_runners = _load_ci_runners(root, secret_keys)
    tags = root.get("tags")
    root.finish()
    return StackConfig(
        project=project, stack=stack, region=region, namespace=namespace,
        tags=MappingProxyType({**tags, "project": project, "stack": stack, "managed-by": "pulumi"}),
        network=network, cluster=cluster, system_nodes=system_nodes, gpu_node_groups=groups,
        storage=storage, addons=addons, sizing=plan, hf_model_id=workload.hf_model_id,
        training_node_group=workload.training_group, serving_node_group=workload.serving_group, pipeline=pipeline,
        autoscaling=autoscaling,
        ci_runners=ci_runners,
    )


def _load_network(s: _Section, region: str) -> NetworkConfig:
    cidr = s.get("vpcCidr")
    net = _ipv4_network(s.where("vpcCidr"), cidr, _KEYS_BY_PATH["network.vpcCidr"].allowed)
    _check(16 <= net.prefixlen <= 20, s.where("vpcCidr"), cidr, _KEYS_BY_PATH["network.vpcCidr"].allowed)

    existing_vpc = s.get("existingVpcId")
    private = s.get("existingPrivateSubnetIds", {})
    public = s.get("existingPublicSubnetIds", {})
    if existing_vpc is not None:
        _check(existing_vpc.startswith("vpc-"), s.where("existingVpcId"), existing_vpc, "vpc-…")
        _check(len(private) >= 2, s.where("existingPrivateSubnetIds"), dict(private),
               "subnets in at least 2 zones, as {zone: subnet-id}", "EKS needs subnets in two zones")
        for where, subnets in ((s.where("existingPrivateSubnetIds"), private), (s.where("existingPublicSubnetIds"), public)):
            for zone, subnet in subnets.items():
                _check(subnet.startswith("subnet-") and zone.startswith(region), f"{where}.{zone}", subnet,
                       f"a subnet-… id under a zone name of {region}")
        zones = tuple(private)
    else:
        _check(not private and not public, s.where("existingPrivateSubnetIds"), dict(private) or dict(public),
               "only together with network.existingVpcId")
        zones = s.get("availabilityZones", (f"{region}a", f"{region}b", f"{region}c"))
        _check(2 <= len(zones) <= 3 and len(set(zones)) == len(zones), s.where("availabilityZones"), list(zones),
               "2 or 3 distinct zones")
        for zone in zones:
            _check(bool(re.fullmatch(re.escape(region) + r"[a-z]", zone)), s.where("availabilityZones"), zone,
                   f"zone names of {region}, e.g. {region}a")
    nat = _in(s.where("natGateways"), s.get("natGateways"), NAT_MODES)
    s.finish()
    return NetworkConfig(vpc_cidr=cidr, availability_zones=tuple(zones), nat_gateways=nat,
                         existing_vpc_id=existing_vpc, existing_private_subnet_ids=private,
                         existing_public_subnet_ids=public)


def _load_cluster(s: _Section, version: str) -> ClusterConfig:
    admins = s.get("adminPrincipalArns")
    for arn in admins:
        _check(bool(_ARN.fullmatch(arn)), s.where("adminPrincipalArns"), arn,
               "IAM role or user ARNs, arn:aws:iam::<account>:role/<name> (not assumed-role session ARNs)")
    _check(len(set(admins)) == len(admins), s.where("adminPrincipalArns"), list(admins), "each principal once",
           "An IAM principal can have only one access entry; the identity running `pulumi up` already has one")
    public = s.get("publicEndpoint")
    cidrs = s.get("publicAccessCidrs")
    for cidr in cidrs:
        _check_public_access_cidr(s.where("publicAccessCidrs"), cidr)
    _check(not public or bool(cidrs), s.where("publicAccessCidrs"), list(cidrs),
           "at least one CIDR when cluster.publicEndpoint is true", PUBLIC_ACCESS_HINT)
    _check(public or not cidrs, s.where("publicAccessCidrs"), list(cidrs), "empty while cluster.publicEndpoint is false")
    log_types = s.get("logTypes")
    for log_type in log_types:
        _in(s.where("logTypes"), log_type, LOG_TYPES)
    s.finish()
    return ClusterConfig(kubernetes_version=version, admin_principal_arns=tuple(admins), public_endpoint=public,
                         public_access_cidrs=tuple(cidrs), log_types=tuple(log_types))


# RFC 5737 reserves these for documentation: no client is ever in them, so an allow-list naming one admits nobody.
DOCUMENTATION_RANGES = tuple(ipaddress.IPv4Network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"))
PUBLIC_ACCESS_HINT = ("Put there the public address of the operator's workstation or VPN egress as a /32 (or the "
                      "organisation's egress range), only while bootstrapping; CI reaches the private endpoint from the "
                      "in-cluster runners (ciRunners), so most stacks need no public endpoint at all")


def _check_public_access_cidr(where: str, cidr: str) -> None:
    """A public allow-list entry must be a real, bounded set of clients."""
    allowed = "IPv4 CIDRs of real clients: not 0.0.0.0/0, not a documentation range (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24)"
    network = _ipv4_network(where, cidr, allowed)
    _check(network.prefixlen > 0, where, cidr, allowed, "0.0.0.0/0 opens the API endpoint to the whole internet. " + PUBLIC_ACCESS_HINT)
    _check(not any(network.overlaps(doc) for doc in DOCUMENTATION_RANGES), where, cidr, allowed,
           "That is a documentation range (RFC 5737) no runner or workstation is in. " + PUBLIC_ACCESS_HINT)


_GITHUB_REPO_URL = re.compile(r"https://github\.com/[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}")
_GITHUB_APP_KEYS = ("githubAppId", "githubAppInstallationId", "githubAppPrivateKey")


def _load_ci_runners(root: _Section, secret_keys: Sequence[str]) -> CiRunnersConfig:
    """The in-cluster CI runners. The GitHub App's three values come only from Pulumi secrets, all or none."""
    s = _section(root, "ciRunners")
    enabled = s.get("enabled")
    url = s.get("githubConfigUrl")
    if enabled:
        _check(url is not None and bool(_GITHUB_REPO_URL.fullmatch(url.rstrip("/"))), s.where("githubConfigUrl"), url,
               _KEYS_BY_PATH["ciRunners.githubConfigUrl"].allowed,
               "A repository URL keeps the runners to this repository's workflows; an organisation URL would open them "
               "to every repository of the organisation")
    controller, scale_set = s.get("controllerChartVersion"), s.get("scaleSetChartVersion")
    for name, version in (("controllerChartVersion", controller), ("scaleSetChartVersion", scale_set)):
        _check(bool(re.fullmatch(r"\d+\.\d+\.\d+", version)), s.where(name), version, "a pinned chart version such as 0.14.2")
    # The controller deletes a scale set whose chart version it does not allow (actions-runner-controller
    # gha-runner-scale-set-0.14.2, controllers/actions.github.com/autoscalingrunnerset_controller.go:139-149).
    _check(scale_set == controller, s.where("scaleSetChartVersion"), scale_set,
           f"the controller's chart version ({controller})", "The controller deletes scale sets of another version")
    image = s.get("runnerImage")
    try:
        images.parse(image)
    except images.ImageError as error:
        raise ConfigError(s.where("runnerImage"), image, _KEYS_BY_PATH["ciRunners.runnerImage"].allowed, str(error)) from None
    max_runners, nodes = s.get("maxRunners"), s.get("nodes")
    _check(1 <= max_runners <= 10, s.where("maxRunners"), max_runners, "1..10")
    _check(1 <= nodes <= 4, s.where("nodes"), nodes, "1..4")
    instance_type = _in(s.where("instanceType"), s.get("instanceType"), catalog.SYSTEM_INSTANCE_TYPES)
    s.finish()

    values = {name: root.get(name) for name in _GITHUB_APP_KEYS}
    for name, value in values.items():
        if value is not None and f"{PROJECT}:{name}" not in secret_keys:
            # Never echo the value: it is a credential that was meant to be encrypted.
            raise ConfigError(root.where(name), "<plain text>", _KEYS_BY_PATH[name].allowed,
                              "Plain text would end up in the stack file and the state")
    given = [name for name, value in values.items() if value is not None]
    missing = [name for name in _GITHUB_APP_KEYS if name not in given]
    if given and missing:
        raise ConfigError(root.where(missing[0]), None, _KEYS_BY_PATH[missing[0]].allowed,
                          f"The GitHub App needs all of {', '.join(_GITHUB_APP_KEYS)}; {', '.join(given)} set")
    app = GithubApp(*(values[name] for name in _GITHUB_APP_KEYS)) if given and enabled else None
    return CiRunnersConfig(enabled, url.rstrip("/") if url else None, controller, scale_set, image, max_runners,
                           instance_type, nodes, app)


def _check_sizes(s: _Section, min_size: int, desired: int, max_size: int, min_floor: int) -> None:
    _check(min_size >= min_floor, s.where("minSize"), min_size, f">= {min_floor}")
    _check(max_size >= max(1, min_size), s.where("maxSize"), max_size, f">= 1 and >= minSize ({min_size})")
    _check(min_size <= desired <= max_size, s.where("desiredSize"), desired, f"{min_size}..{max_size} (minSize..maxSize)")


def _load_system_nodes(s: _Section) -> SystemNodesConfig:
    instance_type = _in(s.where("instanceType"), s.get("instanceType"), catalog.SYSTEM_INSTANCE_TYPES)
    sizes = s.get("minSize"), s.get("desiredSize"), s.get("maxSize")
    _check_sizes(s, *sizes, min_floor=1)
    s.finish()
    return SystemNodesConfig(instance_type, *sizes)


@dataclass(frozen=True)
class _GroupDraft:
    """A GPU group as written, before the plan tells how many nodes its stages need."""

    section: _Section
    config: GpuNodeGroupConfig  # max_size/desired_size provisional when not set
    max_size_set: bool


def _load_gpu_node_groups(root: _Section, network: NetworkConfig, stack: str) -> list[_GroupDraft]:
    entries = root.get("gpuNodeGroups")
    drafts: list[_GroupDraft] = []
    for index, entry in enumerate(entries):
        s = _Section(entry, f"{PROJECT}:gpuNodeGroups[{index}]", "gpuNodeGroups[].")
        name = s.get("name")
        _check(bool(_DNS_LABEL.fullmatch(name)) and len(name) <= 20, s.where("name"), name,
               _KEYS_BY_PATH["gpuNodeGroups[].name"].allowed)
        _check(name not in {d.config.name for d in drafts}, s.where("name"), name, "a name no other group has")
        instance_type = _in(s.where("instanceType"), s.get("instanceType"), catalog.GPU_INSTANCE_TYPES)
        zone = _in(s.where("availabilityZone"), s.get("availabilityZone", network.availability_zones[0]),
                   network.availability_zones)
        max_size = s.raw("maxSize")
        sizes = s.get("minSize"), s.get("desiredSize"), (s.get("maxSize") if max_size is not None else 0)
        capacity_type = _in(s.where("capacityType"), s.get("capacityType"), CAPACITY_TYPES)
        reservation = s.get("capacityReservationId")
        if reservation is not None:
            _check(bool(_RESERVATION.fullmatch(reservation)), s.where("capacityReservationId"), reservation,
                   "a reservation id such as cr-0123456789abcdef0")
        _check(capacity_type != "CAPACITY_BLOCK" or reservation is not None, s.where("capacityReservationId"), None,
               "the Capacity Block's reservation id when capacityType is CAPACITY_BLOCK")
        _check(capacity_type != "SPOT" or reservation is None, s.where("capacityReservationId"), reservation,
               "unset when capacityType is SPOT (reservations are On-Demand or Capacity Blocks)")
        root_volume = s.get("rootVolumeGib")
        _check(50 <= root_volume <= 16384, s.where("rootVolumeGib"), root_volume, "50..16384")
        release = s.get("amiReleaseVersion")
        scale_down = s.get("scaleDownAfterMinutes", 15 if is_prod_stack(stack) else 5)
        _check(1 <= scale_down <= 1440, s.where("scaleDownAfterMinutes"), scale_down, "1..1440")
        s.finish()
        drafts.append(_GroupDraft(s, GpuNodeGroupConfig(name, instance_type, zone, *sizes, capacity_type, reservation,
                                                        root_volume, release, scale_down), max_size is not None))
    return drafts


def gpu_phases(plan: sizing.SizingPlan, training_group: str, serving_group: str,
               max_replicas: int) -> tuple[tuple[tuple[str, int, int], ...], ...]:
    """What holds GPUs at once, phase by phase, as (group, whole nodes, GPUs packed on nodes) triples.

    A stage whose input does not exist yet is gated and holds nothing (workloads/gatekeeper.py), so training,
    evaluation and conversion take turns; beside each, the replicas of the model before keep serving, and a
    rollout adds one surge replica (the Deployment's maxSurge 1) or the conversion its TP x PP GPUs."""
    serving, replicas = plan.serving.gpus, plan.serving.gpus * max_replicas
    return (((training_group, plan.parallelism.nodes, 0), (serving_group, 0, replicas)),
            ((training_group, 0, plan.evaluation.gpus), (serving_group, 0, replicas)),
            ((serving_group, 0, serving + replicas),))


def _size_gpu_node_groups(drafts: Sequence[_GroupDraft], workload: _Workload) -> tuple[GpuNodeGroupConfig, ...]:
    """Each group's size comes from the plan: the most nodes of it that can hold GPUs at once."""
    plan = workload.plan
    serving_gpus_per_node = catalog.get(plan.serving.instance_type).gpus
    serving_nodes = math.ceil(plan.serving.gpus / serving_gpus_per_node)  # one replica
    all_replicas = math.ceil(plan.serving.gpus * workload.max_replicas / serving_gpus_per_node)
    phases = gpu_phases(plan, workload.training_group, workload.serving_group, workload.max_replicas)
    groups = []
    for draft in drafts:
        group, s = draft.config, draft.section
        stages = {"training": plan.parallelism.nodes if group.name == workload.training_group else 0,
                  "serving": all_replicas if group.name == workload.serving_group else 0}
        # Stages may take turns on a smaller group, but each must fit on it alone (one serving replica).
        least = max(1, stages["training"], serving_nodes if stages["serving"] else 0)
        gpus_per_node = group.instance.gpus
        planned = max(1, *(sum(n for g, n, _ in phase if g == group.name)
                           + math.ceil(sum(gpus for g, _, gpus in phase if g == group.name) / gpus_per_node)
                           for phase in phases))
        max_size = group.max_size if draft.max_size_set else planned
        needs = ", ".join(f"{stage} {n}" for stage, n in stages.items() if n) or "no stage"
        _check(max_size >= least, s.where("maxSize"), max_size,
               f">= {least} (the plan needs {needs} node(s) of {group.instance_type} on this group)",
               f"Leave maxSize unset for {planned}")
        _check_sizes(s, group.min_size, group.desired_size, max_size, min_floor=0)
        _check(group.desired_size == 0 or group.desired_size >= least, s.where("desiredSize"), group.desired_size,
               f"0 (idle) or {least}..{max_size}: the plan needs {needs} node(s) on this group")
        groups.append(replace(group, max_size=max_size))
    return tuple(groups)


# The training request's numbers, in TrainingRequest's order.
TRAINING_NUMBERS = ("seqLength", "microBatchSize", "globalBatchSize", "loraRank", "datasetTokens", "epochs",
                    "nodes", "tp", "pp")


def _check_fixed_count(where: Callable[[str], str], name: str, value: int | None) -> None:
    """A count the planner chooses when it is unset; 0 is not a way to say "choose"."""
    _check(value is None or value >= 1, where(name), value, ">= 1",
           f"Leave {where(name)} unset to let the planner choose")


def check_training_numbers(model: sizing.ModelSpec, numbers: Mapping[str, Any], where: Callable[[str], str]) -> None:
    """The limits of a training request's numbers (``TRAINING_NUMBERS``; None where unset). The stack config and
    ``python -m infra.sizing`` both check through here, so they accept exactly the same values; ``where`` names a
    setting for the message (a stack-config key, or a command-line flag)."""
    seq_length = numbers["seqLength"]
    _check(128 <= seq_length <= model.max_seq_length, where("seqLength"), seq_length,
           f"128..{model.max_seq_length} ({model.display})")
    micro, global_batch = numbers["microBatchSize"], numbers["globalBatchSize"]
    _check(1 <= micro <= 64, where("microBatchSize"), micro, "1..64")
    _check(global_batch >= micro, where("globalBatchSize"), global_batch, f">= microBatchSize ({micro})")
    rank = numbers["loraRank"]
    _check(1 <= rank <= 512, where("loraRank"), rank, "1..512")
    dataset_tokens = numbers["datasetTokens"]
    _check(dataset_tokens is None or dataset_tokens >= 1, where("datasetTokens"), dataset_tokens, ">= 1")
    epochs = numbers["epochs"]
    _check(math.isfinite(epochs) and epochs > 0, where("epochs"), epochs, "a finite number > 0")
    for name in ("nodes", "tp", "pp"):
        _check_fixed_count(where, name, numbers[name])


_SIZING_KEYS = {"method": "training.method", "precision": "training.precision", "seq_length": "training.seqLength",
                "global_batch_size": "training.globalBatchSize", "micro_batch_size": "training.microBatchSize",
                "lora_rank": "training.loraRank", "epochs": "training.epochs", "tp": "training.tp",
                "pp": "training.pp", "vp": "training.vp", "nodes": "training.nodes"}


@dataclass(frozen=True)
class _Workload:
    plan: sizing.SizingPlan
    hf_model_id: str
    training_group: str
    serving_group: str
    max_steps: int
    learning_rate: float
    backend: str
    min_replicas: int
    max_replicas: int
    target_queue_time_ms: int


def _load_model_and_plan(root: _Section, drafts: Sequence[_GroupDraft]) -> _Workload:
    """The model, the training request and the serving shape, planned."""
    m, t, v = _section(root, "model"), _section(root, "training"), _section(root, "serving")
    variant = _in(m.where("variant"), m.get("variant"), tuple(sizing.VARIANTS))
    preset = m.get("preset")
    if preset is not None:
        _in(m.where("preset"), preset, sizing.VARIANTS[variant])
    model = sizing.model_for(variant, preset)
    hf_id = m.get("hfModelId", model.hf_id)
    _check(bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", hf_id)), m.where("hfModelId"), hf_id,
           "a Hugging Face id, <org>/<name>")
    m.finish()

    names = [d.config.name for d in drafts]
    training_group = _in(t.where("nodeGroup"), t.get("nodeGroup", names[0]), names)
    serving_group = _in(v.where("nodeGroup"), v.get("nodeGroup", training_group), names)
    instance = next(d.config.instance for d in drafts if d.config.name == training_group)
    serving_instance = next(d.config.instance for d in drafts if d.config.name == serving_group)

    method = _in(t.where("method"), t.get("method"), sizing.METHODS)
    precision = _in(t.where("precision"), t.get("precision"), sizing.PRECISIONS)
    numbers = {name: t.get(name) for name in TRAINING_NUMBERS}
    check_training_numbers(model, numbers, t.where)
    seq_length, micro, global_batch, rank, dataset_tokens, epochs, nodes, tp, pp = numbers.values()
    vp = t.get("vp")  # a stack-config key only: the sizing CLI's flags stay as they are
    _check_fixed_count(t.where, "vp", vp)
    max_steps = t.get("maxSteps")
    if max_steps is None:
        max_steps = math.ceil(dataset_tokens * epochs / (global_batch * seq_length)) if dataset_tokens else 1000
    _check(max_steps >= 1, t.where("maxSteps"), max_steps, ">= 1")
    learning_rate = t.get("learningRate", 1e-4 if method == "lora" else 5e-6)
    _check(0 < learning_rate < 1, t.where("learningRate"), learning_rate, "> 0 and < 1")
    backend = _in(v.where("backend"), v.get("backend"), images.BACKENDS)
    min_replicas, max_replicas = v.get("minReplicas"), v.get("maxReplicas")
    _check(min_replicas >= 1, v.where("minReplicas"), min_replicas, ">= 1")
    _check(max_replicas >= min_replicas, v.where("maxReplicas"), max_replicas, f">= minReplicas ({min_replicas})")
    target_queue = v.get("targetQueueTimeMs")
    _check(1 <= target_queue <= 60000, v.where("targetQueueTimeMs"), target_queue, "1..60000")
    serving_tp = v.get("tp")
    _check_fixed_count(v.where, "tp", serving_tp)
    serving_seq = v.get("maxSeqLength", seq_length)
    _check(128 <= serving_seq <= model.max_seq_length, v.where("maxSeqLength"), serving_seq,
           f"128..{model.max_seq_length} ({model.display})")
    t.finish()
    v.finish()

    request = sizing.TrainingRequest(
        model, method, instance, precision, seq_length, micro, global_batch, rank, dataset_tokens, epochs,
        nodes, tp, pp, vp, serving_tp=serving_tp, serving_max_seq_length=serving_seq)
    try:
        plan = sizing.plan(request)
    except sizing.SizingError as error:
        key = _SIZING_KEYS[error.field]
        section, name = (t, key.split(".")[1])
        raise ConfigError(section.where(name), getattr(request, error.field), str(error)) from None
    if serving_instance.name != instance.name:
        serving = sizing.serving_plan(model, serving_instance, serving_seq, serving_tp)
        plan = replace(plan, serving=serving, fits=plan.memory.fits and serving.fits,
                       reasons=tuple(r for r in plan.reasons if r != plan.serving.reason)
                       + (() if serving.fits else (serving.reason,)))
    if not plan.memory.fits:
        fixed = [(n, val) for n, val in (("nodes", nodes), ("tp", tp), ("pp", pp), ("vp", vp)) if val]
        where, value = (t.where(fixed[0][0]), fixed[0][1]) if fixed else (t.where("method"), method)
        if not fixed:
            index = names.index(training_group)
            where, value = f"{PROJECT}:gpuNodeGroups[{index}].instanceType", instance.name
        raise ConfigError(where, value, f"a setting that fits: {plan.nearest}", plan.reasons[0])
    if not plan.serving.fits:
        auto = sizing.serving_plan(model, serving_instance, serving_seq)
        if serving_tp and auto.fits:
            raise ConfigError(v.where("tp"), serving_tp, f"nearest: serving TP {auto.tp}", plan.serving.reason)
        widest = sizing.serving_plan(model, serving_instance, 128, serving_instance.gpus)
        if not widest.fits:  # the weights alone do not fit one node: the group's instance type is the problem
            index = names.index(serving_group)
            raise ConfigError(f"{PROJECT}:gpuNodeGroups[{index}].instanceType", serving_instance.name,
                              "an instance type whose GPUs hold the serving engine on one node "
                              "(FP8 on p5.48xlarge, p5e.48xlarge or p5en.48xlarge for the largest models)",
                              widest.reason)
        raise ConfigError(v.where("maxSeqLength"), serving_seq,
                          f"a length whose KV cache fits one {serving_instance.name}", plan.serving.reason)
    return _Workload(plan, hf_id, training_group, serving_group, max_steps, learning_rate, backend, min_replicas,
                     max_replicas, target_queue)


def valid_fsx_capacity(gib: int) -> bool:
    """PERSISTENT_2 SSD: 1200 GiB, 2400 GiB, then increments of 2400 GiB."""
    return gib == 1200 or (gib >= 2400 and gib % 2400 == 0)


def _load_storage(s: _Section, network: NetworkConfig, groups: Sequence[GpuNodeGroupConfig], stack: str,
                  plan: sizing.SizingPlan) -> StorageConfig:
    recommended = plan.storage
    capacity = s.get("fsxStorageCapacityGib", recommended.fsx_capacity_gib)
    if not valid_fsx_capacity(capacity):
        nearest = 1200 if capacity < 1800 else max(2400, -(-capacity // 2400) * 2400)
        raise ConfigError(s.where("fsxStorageCapacityGib"), capacity, _KEYS_BY_PATH["storage.fsxStorageCapacityGib"].allowed,
                          f"The nearest valid capacity is {nearest}")
    _check(capacity * sizing.GIB >= recommended.needed_bytes, s.where("fsxStorageCapacityGib"), capacity,
           f">= {sizing.smallest_fsx_capacity(recommended.needed_bytes)} for this plan",
           f"The plan keeps {recommended.checkpoints_kept} checkpoints of {recommended.checkpoint_bytes / sizing.GIB:.0f} GiB, "
           f"the base model and exports: {recommended.needed_bytes / sizing.GIB:.0f} GiB with 20% free")
    throughput = s.get("fsxThroughputPerTib", recommended.fsx_throughput_per_tib)
    _check(throughput in FSX_THROUGHPUTS_MB_PER_TIB, s.where("fsxThroughputPerTib"), throughput,
           ", ".join(map(str, FSX_THROUGHPUTS_MB_PER_TIB)) + " (PERSISTENT_2)")
    zone = _in(s.where("fsxAvailabilityZone"), s.get("fsxAvailabilityZone", groups[0].availability_zone),
               network.availability_zones)
    noncurrent = s.get("noncurrentVersionDays")
    _check(1 <= noncurrent <= 3650, s.where("noncurrentVersionDays"), noncurrent, "1..3650")
    abort_days = s.get("abortIncompleteUploadDays")
    _check(1 <= abort_days <= 365, s.where("abortIncompleteUploadDays"), abort_days, "1..365")
    protect = s.get("protect", is_prod_stack(stack))
    metadata_mode = _in(s.where("fsxMetadataMode"), s.get("fsxMetadataMode"), FSX_METADATA_MODES)
    metadata_iops = s.get("fsxMetadataIops")
    if metadata_mode == "USER_PROVISIONED":
        _check(metadata_iops in FSX_METADATA_IOPS, s.where("fsxMetadataIops"), metadata_iops,
               _KEYS_BY_PATH["storage.fsxMetadataIops"].allowed)
    else:
        _check(metadata_iops is None, s.where("fsxMetadataIops"), metadata_iops,
               "unset unless storage.fsxMetadataMode is USER_PROVISIONED", "AUTOMATIC mode sizes metadata IOPS itself")
    s.finish()
    return StorageConfig(capacity, throughput, zone, noncurrent, abort_days, protect, metadata_mode, metadata_iops)


_DATASET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _load_pipeline(root: _Section, workload: _Workload, secret_keys: Sequence[str]) -> PipelineConfig:
    d, i, p, m = (_section(root, name) for name in ("data", "images", "pipeline", "monitoring"))
    dataset = d.get("dataset")
    _check(bool(_DATASET.fullmatch(dataset)) and ".." not in dataset, d.where("dataset"), dataset,
           _KEYS_BY_PATH["data.dataset"].allowed)
    d.finish()
    nemo_image, triton_image = i.get("nemo"), i.get("triton")
    try:
        images.check_nemo(nemo_image)
    except images.ImageError as error:
        raise ConfigError(i.where("nemo"), nemo_image, str(error)) from None
    try:
        images.check_triton(triton_image, workload.backend)
    except images.ImageError as error:
        raise ConfigError(i.where("triton"), triton_image, str(error),
                          f"serving.backend is {workload.backend}") from None
    efa = _load_efa(_section(root, "efa"), i, workload, nemo_image)
    i.finish()
    credentials = {}
    for name in ("ngcApiKey", "hfToken"):
        credentials[name] = root.get(name)
        if credentials[name] is not None and f"{PROJECT}:{name}" not in secret_keys:
            # Never echo the value: it is a credential that was meant to be encrypted.
            raise ConfigError(root.where(name), "<plain text>", _KEYS_BY_PATH[name].allowed,
                              "Plain text would end up in the stack file and the state")
    enabled, wait, timeout = p.get("enabled"), p.get("waitForCompletion"), p.get("timeoutMinutes")
    _check(10 <= timeout <= 10080, p.where("timeoutMinutes"), timeout, "10..10080")
    p.finish()
    monitoring = _load_monitoring(m)
    return PipelineConfig(enabled, dataset, workload.max_steps, workload.learning_rate, nemo_image, triton_image,
                          workload.backend, workload.min_replicas, workload.max_replicas,
                          workload.target_queue_time_ms, wait, timeout, monitoring,
                          _load_evaluation(_section(root, "evaluation")), credentials["ngcApiKey"],
                          credentials["hfToken"], _load_fault_tolerance(_section(root, "faultTolerance")), efa)


def _load_efa(s: _Section, images_section: _Section, workload: _Workload, nemo_image: str) -> EfaConfig:
    """Multi-node training on an EFA instance type needs NCCL over EFA: an image that can load the plugin (the
    project's, by default), the pre-flight check and the fabric test with its floor."""
    instance, nodes = workload.plan.request.instance, workload.plan.parallelism.nodes
    multi_node = nodes > 1 and instance.efa
    explicit = images_section.get("training")
    if explicit is not None:
        try:
            images.parse(explicit)
        except images.ImageError as error:
            raise ConfigError(images_section.where("training"), explicit, str(error)) from None
    built_tag = None
    if multi_node and explicit is None:
        try:
            built_tag = images.training_image_for(nemo_image).tag
        except images.ImageError as error:
            raise ConfigError(images_section.where("nemo"), nemo_image, str(error),
                              f"training spans {nodes} x {instance.name} and needs NCCL over EFA") from None
    fabric_test = s.get("fabricTest")
    floor = catalog.FABRIC_FLOORS.get(instance.name)
    minimum = s.get("minBusBandwidthGBps", floor.floor_gbps if floor else None)
    if multi_node and fabric_test:
        _check(minimum is not None, s.where("minBusBandwidthGBps"), minimum,
               f"> 0 (no published floor for {instance.name} in infra/catalog.py FABRIC_FLOORS)")
    _check(minimum is None or minimum > 0, s.where("minBusBandwidthGBps"), minimum, "> 0")
    s.finish()
    return EfaConfig(multi_node=multi_node, efa_devices=instance.efa_interfaces if multi_node else 0,
                     training_image=explicit, built_image_tag=built_tag, fabric_test=multi_node and fabric_test,
                     min_bus_bandwidth_gbps=float(minimum or 0.0))


def _load_monitoring(s: _Section) -> MonitoringConfig:
    stack = _in(s.where("stack"), s.get("stack"), MONITORING_STACKS)
    url = s.get("prometheusUrl")
    _check(stack != "existing" or url is not None, s.where("prometheusUrl"), url,
           "the URL of the cluster's Prometheus when monitoring.stack is existing")
    if url is not None:
        _check(bool(re.fullmatch(r"https?://[A-Za-z0-9.-]+(:\d+)?(/\S*)?", url)), s.where("prometheusUrl"), url,
               "http(s)://host[:port]")
    versions = {name: s.get(name) for name in ("kubePrometheusStackVersion", "dcgmExporterVersion",
                                                 "prometheusAdapterVersion")}
    for name, version in versions.items():
        _check(bool(re.fullmatch(r"v?\d+\.\d+\.\d+", version)), s.where(name), version, "a pinned chart version such as 1.2.3")
    drop, window = s.get("throughputDropFraction"), s.get("lossWindowMinutes")
    queue, failures = s.get("tritonQueueTimeMs"), s.get("tritonFailureRatio")
    _check(0.05 <= drop <= 0.95, s.where("throughputDropFraction"), drop, "0.05..0.95")
    _check(15 <= window <= 1440, s.where("lossWindowMinutes"), window, "15..1440")
    _check(1 <= queue <= 600000, s.where("tritonQueueTimeMs"), queue, "1..600000")
    _check(0 <= failures <= 1, s.where("tritonFailureRatio"), failures, "0..1")
    pending = s.get("pendingGpuPodMinutes")
    _check(1 <= pending <= 1440, s.where("pendingGpuPodMinutes"), pending, "1..1440")
    s.finish()
    return MonitoringConfig(stack, url or INSTALLED_PROMETHEUS_URL, versions["kubePrometheusStackVersion"],
                            versions["dcgmExporterVersion"], versions["prometheusAdapterVersion"], float(drop),
                            window, queue, float(failures), pending)


def _load_evaluation(s: _Section) -> EvaluationConfig:
    values = {name: s.get(name) for name in ("enabled", "minLossImprovementPercent", "maxExactMatchDrop",
                                              "lossSamples", "generationSamples", "maxNewTokens",
                                              "metricsLingerSeconds")}
    for name, (low, high) in {"minLossImprovementPercent": (-100, 100), "maxExactMatchDrop": (0, 100),
                              "lossSamples": (1, 100000), "generationSamples": (1, 10000), "maxNewTokens": (1, 8192),
                              "metricsLingerSeconds": (0, 86400)}.items():
        _check(low <= values[name] <= high, s.where(name), values[name], f"{low}..{high}")
    s.finish()
    return EvaluationConfig(values["enabled"], float(values["minLossImprovementPercent"]),
                            float(values["maxExactMatchDrop"]), values["lossSamples"], values["generationSamples"],
                            values["maxNewTokens"], values["metricsLingerSeconds"])


def _load_fault_tolerance(s: _Section) -> FaultToleranceConfig:
    values = {name: s.get(name) for name in ("workerRestarts", "podRestarts", "ncclTimeoutSeconds",
                                              "rendezvousTimeoutSeconds")}
    for name, (low, high) in {"workerRestarts": (0, 1000), "podRestarts": (0, 100), "ncclTimeoutSeconds": (60, 7200),
                              "rendezvousTimeoutSeconds": (60, 7200)}.items():
        _check(low <= values[name] <= high, s.where(name), values[name], f"{low}..{high}")
    s.finish()
    return FaultToleranceConfig(values["workerRestarts"], values["podRestarts"], values["ncclTimeoutSeconds"],
                                values["rendezvousTimeoutSeconds"])


def _load_addons(s: _Section) -> AddonsConfig:
    versions = {name: s.get(name) for name in ("nvidiaDevicePluginVersion", "efaDevicePluginVersion",
                                                 "podIdentityAgentVersion", "fsxCsiDriverVersion")}
    for name, version in versions.items():
        _check(version is None or bool(re.fullmatch(r"v?\d+\.\d+\.\d+([-+.][0-9A-Za-z.-]+)?", version)),
               s.where(name), version, "a pinned version such as 0.17.4 or v1.2.0-eksbuild.1 (no ranges, no 'latest')")
    s.finish()
    return AddonsConfig(versions["nvidiaDevicePluginVersion"], versions["efaDevicePluginVersion"],
                        versions["podIdentityAgentVersion"], versions["fsxCsiDriverVersion"])


def _load_autoscaling(s: _Section, kubernetes_version: str) -> AutoscalingConfig:
    enabled, chart = s.get("enabled"), s.get("chartVersion")
    _check(bool(re.fullmatch(r"\d+\.\d+\.\d+", chart)), s.where("chartVersion"), chart,
           "a pinned chart version such as 9.59.0 (no ranges, no 'latest')")
    minor = int(kubernetes_version.split(".")[1])
    known = CLUSTER_AUTOSCALER_RELEASES.get(minor)
    tag = s.get("imageTag", known)
    if tag is None:
        raise ConfigError(s.where("imageTag"), None, f"a Cluster Autoscaler release v1.{minor}.<patch>",
                          f"No release of the autoscaler for Kubernetes 1.{minor} is known here: set it "
                          f"(github.com/kubernetes/autoscaler/releases lists them)")
    match = re.fullmatch(r"v1\.(\d+)\.\d+", tag)
    _check(bool(match), s.where("imageTag"), tag, f"a release tag v1.{minor}.<patch>")
    _check(int(match.group(1)) == minor, s.where("imageTag"), tag,
           f"v1.{minor}.<patch>: the autoscaler's minor must be the cluster's (kubernetesVersion {kubernetes_version})",
           f"The newest known is {known}" if known else "")
    s.finish()
    return AutoscalingConfig(enabled, chart, tag)


# --------------------------------------------------------------------------------------------------
# Config namespaces and stack files

# The namespaces whose keys the program acts on. `nemo-eks:` is the program's own. `aws:` configures the default AWS
# provider, which every AWS resource here uses (none is given an explicit provider; e.g. aws:region, aws:profile).
# `pulumi:` holds the engine's own settings, e.g. `pulumi:disable-default-providers` (pulumi/pulumi#8829).
# Not `kubernetes:`: every Kubernetes resource uses the explicit provider infra/cluster.py builds from the new
# cluster's kubeconfig, and stack config only configures a default provider ("Default Provider Configuration",
# https://www.pulumi.com/docs/iac/concepts/resources/providers/), so such a key would be silently ignored. Not
# `eks:`: pulumi-eks declares no provider configuration (pulumi_eks 4.x has no config module).
CONFIG_NAMESPACES = (PROJECT, "aws", "pulumi")
_IGNORED_NAMESPACES = {
    "kubernetes": "every Kubernetes resource of the program uses its own provider, built from the new cluster's "
                  "kubeconfig, which stack config does not reach",
    "eks": "pulumi-eks takes no provider configuration",
}


def check_config_key(key: str) -> None:
    """A config key must be in a namespace the program reads: a key under any other (`nemo_eks:training`)
    would be silently ignored."""
    namespace = key.split(":", 1)[0] if ":" in key else PROJECT
    if namespace in CONFIG_NAMESPACES:
        return
    close = difflib.get_close_matches(namespace, CONFIG_NAMESPACES, n=1, cutoff=0.5)
    if namespace in _IGNORED_NAMESPACES:
        hint = f"A key under '{namespace}:' would be ignored: {_IGNORED_NAMESPACES[namespace]}"
    elif close:
        hint = f"Did you mean '{close[0]}:{key.split(':', 1)[1]}'?"
    else:
        hint = f"A key under '{namespace}:' would be ignored; remove it, or move it under '{PROJECT}:'"
    raise ConfigError(key, namespace, "the namespaces " + ", ".join(CONFIG_NAMESPACES), hint)


class StackFileError(ValueError):
    """A stack file that cannot be read. The message names the file (and line and column) and the fix."""


# The top-level keys of a Pulumi.<stack>.yaml: pulumi/pulumi sdk/go/common/workspace/project.go, type ProjectStack.
STACK_FILE_KEYS = ("config", "environment", "secretsprovider", "encryptedkey", "encryptionsalt")
SECRET_PLACEHOLDER = "[secret]"  # a `secure:` value: the ciphertext can only be decrypted by the Pulumi CLI


def _strict_loader():
    import yaml

    class StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # the C parser where PyYAML has it
        """YAML keeps the last of two equal keys in a mapping without a word; a stack file must not."""

        def construct_mapping(self, node, deep=False):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the constructor below reports it
                    continue
                if first is not key_node.start_mark:
                    raise _DuplicateKey(key, first, key_node.start_mark)
            return super().construct_mapping(node, deep)

    return StrictLoader


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: Any, again: Any):
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


def _mark(shown: str, mark: Any) -> str:
    return f"{shown}:{mark.line + 1}:{mark.column + 1}"


def read_stack_file(path: Any, shown: str | None = None) -> tuple[dict[str, str], list[str]]:
    """THE reader of a stack file, for every tool and for the program under `pulumi up`: the config as the Pulumi
    CLI hands it to the program (every value a string, objects and lists as JSON) and the names of secret keys
    (their values become ``SECRET_PLACEHOLDER``). Raises StackFileError naming the file, line and column for what
    YAML or the Pulumi CLI would take silently or with a stack trace, and ConfigError-worded messages for keys
    in namespaces the program does not read."""
    import yaml

    file = Path(path)
    shown = shown or str(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StackFileError(f"{shown}: no such stack file") from None
    except IsADirectoryError:
        raise StackFileError(f"{shown}: is a directory, not a stack file (Pulumi.<stack>.yaml)") from None
    except UnicodeDecodeError as error:
        raise StackFileError(f"{shown}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    loader = _strict_loader()(text)
    try:
        node = loader.get_single_node()
        document = loader.construct_document(node) if node is not None else None
    except _DuplicateKey as duplicate:
        raise StackFileError(
            f"{_mark(shown, duplicate.again)}: key '{duplicate.key}' is written twice in one mapping (first at line "
            f"{duplicate.first.line + 1}); YAML would silently keep the last one. Keep one of them") from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problem = error.problem or error.context or "not valid YAML"
        lines = text.splitlines()
        tab = mark is not None and mark.line < len(lines) and "\t" in lines[mark.line]
        fix = ("indent with spaces: YAML does not allow tabs for indentation" if tab or "\t" in problem
               else "fix the YAML at that place (indentation, a missing ':' or an unclosed quote or bracket)")
        where = _mark(shown, mark) if mark is not None else shown
        raise StackFileError(f"{where}: not valid YAML: {problem}; {fix}") from None
    except yaml.YAMLError as error:
        raise StackFileError(f"{shown}: not valid YAML: {error}") from None
    finally:
        loader.dispose()
    if document is None:
        document, node = {}, None
    if not isinstance(document, dict):
        raise StackFileError(f"{shown}: the file is a {_yaml_kind(document)}, not a mapping; a stack file is a "
                             f"mapping with `config:`, e.g. `config:` then `  aws:region: us-east-1`")
    nodes = {k.value: (k, v) for k, v in node.value} if node is not None else {}
    for name in document:
        if name not in STACK_FILE_KEYS:
            close = difflib.get_close_matches(str(name), STACK_FILE_KEYS, n=1)
            raise StackFileError(f"{_mark(shown, nodes[name][0].start_mark) if name in nodes else shown}: "
                                 f"unknown top-level key '{name}'; allowed: {', '.join(STACK_FILE_KEYS)}"
                                 + (f". Did you mean '{close[0]}'?" if close else ""))
    settings = {} if document.get("config") is None else document["config"]  # `config: []` is not "no config"
    config_node = nodes.get("config", (None, None))[1]
    if not isinstance(settings, dict):
        where = _mark(shown, config_node.start_mark) if config_node is not None else shown
        raise StackFileError(f"{where}: `config:` is a {_yaml_kind(settings)}, not a mapping; write one "
                             f"`<namespace>:<key>: value` per line under it, e.g. `  aws:region: us-east-1`")
    key_nodes = {k.value: (k, v) for k, v in config_node.value} if isinstance(config_node, yaml.MappingNode) else {}
    raw, secret_keys = {}, []
    for name, value in settings.items():
        key_node, value_node = key_nodes.get(name, (None, None))
        where = _mark(shown, key_node.start_mark) if key_node is not None else shown
        key = str(name) if ":" in str(name) else f"{PROJECT}:{name}"  # the CLI's reading of a bare key
        try:
            check_config_key(key)
        except ConfigError as error:
            raise StackFileError(f"{where}: {error}") from None
        _check_unquoted_strings(key, value, value_node, shown)
        if isinstance(value, dict) and set(value) == {"secure"}:
            raw[key], secret_keys = SECRET_PLACEHOLDER, [*secret_keys, key]
        elif isinstance(value, str):
            raw[key] = value
        elif isinstance(value, bool):
            raw[key] = "true" if value else "false"
        else:
            try:
                raw[key] = json.dumps(value, allow_nan=False, default=str)
            except ValueError:  # .inf/.nan: leave them to the key's own check, which names and rejects them
                raw[key] = json.dumps(value, default=str)
    return raw, secret_keys


def _yaml_kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "value")


def _check_unquoted_strings(key: str, value: Any, node: Any, shown: str) -> None:
    """A string-valued key written as a plain number loses characters on the way (1.30 -> 1.3): say to quote it."""
    if node is None or not key.startswith(f"{PROJECT}:"):
        return
    name = key.split(":", 1)[1]
    pairs = [(name, value, node)]
    if isinstance(value, dict) and node.tag == "tag:yaml.org,2002:map":
        pairs += [(f"{name}.{k.value}", value.get(k.value), v) for k, v in node.value]
    for path, number, value_node in pairs:
        spec = _KEYS_BY_PATH.get(path)
        if spec is None or spec.type != "string" or isinstance(number, bool) or not isinstance(number, (int, float)):
            continue
        text = value_node.value
        if str(number) != text:
            raise StackFileError(f"{_mark(shown, value_node.start_mark)}: {PROJECT}:{path}: {text} is read by YAML "
                                 f"as the number {number}; quote it: \"{text}\"")


def from_pulumi() -> StackConfig:
    """Load the running stack's config. Called once, by ``__main__``; nothing else reads ``pulumi.Config``."""
    import pulumi
    from pulumi.runtime import config as runtime_config

    # The language host hands the program the whole config map; reading it whole lets us reject unknown keys.
    raw = {**runtime_config.get_config_env(), **runtime_config.CONFIG.get()}
    secret_keys = [key for key in raw if runtime_config.is_config_secret(key)] + runtime_config.get_config_secret_keys_env()
    return load(raw, pulumi.get_stack(), pulumi.get_project(), secret_keys)
