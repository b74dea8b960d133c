"""The stack's ECR repository for the EFA training image (images/training/Dockerfile), declared when the stack
trains across nodes with the project-built image. The image itself is built and pushed outside `pulumi up`
(.github/workflows/training-image.yml, `make image`): a 20+ GB build has no place in a deployment."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

import pulumi
import pulumi_aws as aws

from infra import images

UNTAGGED_DAYS = 7  # a failed or interrupted push leaves untagged layers behind
TAGGED_KEPT = 10  # every tag is a base image and installer pair; a stack only ever uses its current one


def lifecycle_policy() -> str:
    """Untagged images go after a week, and only the ten newest images are kept. A rule with tagStatus `any`
    must have the highest rulePriority (Amazon ECR user guide, lifecycle_policy_parameters, "Rule priority")."""
    return json.dumps({"rules": [
        {"rulePriority": 1, "description": f"untagged images after {UNTAGGED_DAYS} days",
         "selection": {"tagStatus": "untagged", "countType": "sinceImagePushed", "countUnit": "days",
                       "countNumber": UNTAGGED_DAYS},
         "action": {"type": "expire"}},
        {"rulePriority": 2, "description": f"keep the {TAGGED_KEPT} newest images",
         "selection": {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": TAGGED_KEPT},
         "action": {"type": "expire"}},
    ]}, sort_keys=True)


@dataclass(frozen=True)
class TrainingImageRegistryArgs:
    prefix: str
    image_tag: str  # infra/images.py TrainingImage.tag of the stack's NeMo base
    protect: bool  # prod: the repository outlives `pulumi destroy`, as the buckets do
    tags: Mapping[str, str]


class TrainingImageRegistry(pulumi.ComponentResource):
    repository: aws.ecr.Repository
    image: pulumi.Output[str]  # <registry>/<repository>:<tag>, what the training pods run

    def __init__(self, name: str, args: TrainingImageRegistryArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("nemo-eks:infra:TrainingImageRegistry", name, None, opts)
        stateful = pulumi.ResourceOptions(parent=self, protect=args.protect, retain_on_delete=args.protect)
        # Immutable tags: a tag names one build for good, so a pod never runs a different image under the name
        # its run was planned with; scan on push reports the base image's CVEs in ECR.
        self.repository = aws.ecr.Repository(
            f"{name}-repository", name=images.training_repository_name(args.prefix),
            image_tag_mutability="IMMUTABLE", image_scanning_configuration={"scan_on_push": True},
            encryption_configurations=[{"encryption_type": "AES256"}], force_delete=not args.protect,
            tags=dict(args.tags), opts=stateful)
        aws.ecr.LifecyclePolicy(f"{name}-lifecycle", repository=self.repository.name, policy=lifecycle_policy(),
                                opts=pulumi.ResourceOptions(parent=self))
        self.image = self.repository.repository_url.apply(lambda url: f"{url}:{args.image_tag}")
        outputs: dict[str, Any] = {"repositoryUrl": self.repository.repository_url, "image": self.image}
        self.register_outputs(outputs)
