"""The fine-tuning dataset CLI: check a JSONL file, and upload it to a stack's datasets bucket.

    python -m tools.data validate FILE [--validation FILE] [--seq-length N] [--stack NAME]
    python -m tools.data upload FILE [--validation FILE] --stack NAME [--dataset NAME] [--bucket NAME]

Each line is a JSON object with non-empty string fields ``input`` and ``output``. Bad input gets a report with
line numbers and exit status 1, and nothing is uploaded. Without ``--validation`` a deterministic validation
split is taken from FILE. Files land at ``s3://<bucket>/<dataset>/train.jsonl`` and ``validation.jsonl``, which
FSx shows the training pods at ``/fsx/datasets/<dataset>/``.

The bucket is found by its tags (``project=nemo-eks``, ``stack=<stack>``, ``nemo-eks/data=datasets``) unless
``--bucket`` names it. The dataset name and sequence length default to the stack file's (``data.dataset``,
``training.seqLength``) so the upload lands where that stack's run reads. With ``--stack`` the validation set must
hold one global batch (``training.globalBatchSize``), as ``finetune.py --prepare`` requires: a derived split takes
that many, a smaller ``--validation`` file is refused. AWS credentials and region come from
the usual environment (AWS_PROFILE, AWS_REGION, AWS_ENDPOINT_URL, ...).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from workloads.entrypoints import dataset

PROJECT_TAG = ("project", "nemo-eks")
DATA_TAG = ("nemo-eks/data", "datasets")
# Multipart above 64 MiB, in 64 MiB parts: a 10,000-part upload then covers 640 GiB, and a failed part costs
# one retry of 64 MiB, not the whole file.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 64 * 1024 * 1024
MAX_CONCURRENCY = 8
_DATASET_NAME = re.compile(r"[A-Za-z0-9._-]+")


class CliError(Exception):
    """A message for the person at the terminal; exit status 1."""


@dataclass(frozen=True)
class StackDefaults:
    dataset: str | None = None
    seq_length: int | None = None
    global_batch_size: int | None = None


def stack_name(stack: str) -> str:
    """The stack's name, for ``--stack`` given as a name or as a stack file's path."""
    from tools import synth

    return synth.stack_file(stack)[0]


def stack_defaults(stack: str | None) -> StackDefaults:
    """The dataset name, sequence length and global batch size the stack's run will use, from its stack file
    (which must exist and be valid: a typo in --stack would otherwise upload where no run reads)."""
    if not stack:
        return StackDefaults()
    from infra import config
    from tools import synth

    try:
        raw, secret_keys = synth.read_stack_config(stack)
        cfg = config.load(raw, stack_name(stack), secret_keys=secret_keys)
    except synth.StackFileError as error:
        raise CliError(f"--stack {stack}: {error}") from None
    except config.ConfigError as error:
        raise CliError(f"--stack {stack}: {error} (`python -m tools.synth {stack}` shows the same)") from None
    return StackDefaults(dataset=cfg.pipeline.dataset, seq_length=cfg.sizing.request.seq_length,
                         global_batch_size=cfg.sizing.request.global_batch_size)


def positive_integer(text: str) -> int:
    """argparse type of --seq-length: a count of tokens."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid; allowed: a whole number >= 1 (tokens, e.g. the "
                                         f"stack's training.seqLength such as 4096)")
    return value


# --------------------------------------------------------------------------------------------------
# S3


NO_CREDENTIALS = ("no AWS credentials found. Provide them the usual way: AWS_PROFILE=<profile> (after "
                  "`aws sso login --profile <profile>` or `aws configure --profile <profile>`), or AWS_ACCESS_KEY_ID "
                  "and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones); check with "
                  "`aws sts get-caller-identity`")


def s3_client():
    import boto3

    session = boto3.Session()  # region, credentials and endpoint from the environment / profile
    if session.get_credentials() is None:
        raise CliError(NO_CREDENTIALS)
    return session.client("s3")


def find_datasets_bucket(s3, stack: str) -> str:
    """The one bucket tagged as this stack's datasets bucket."""
    from botocore.exceptions import ClientError

    wanted = {PROJECT_TAG, ("stack", stack), DATA_TAG}
    matches = []
    for bucket in s3.list_buckets().get("Buckets", []):
        try:
            tags = {(t["Key"], t["Value"]) for t in s3.get_bucket_tagging(Bucket=bucket["Name"])["TagSet"]}
        except ClientError:
            continue  # untagged, or another region's bucket we may not read: not ours
        if wanted <= tags:
            matches.append(bucket["Name"])
    if not matches:
        raise CliError(f"no S3 bucket tagged project=nemo-eks, stack={stack}, nemo-eks/data=datasets in this account. "
                       f"Has `pulumi up` run for stack {stack!r}? Or pass --bucket NAME.")
    if len(matches) > 1:
        raise CliError(f"several buckets are tagged as stack {stack!r}'s datasets bucket: {', '.join(sorted(matches))};"
                       " pass --bucket NAME")
    return matches[0]


def sha256_checksums(path: str, part_size: int, threshold: int) -> str:
    """The ChecksumSHA256 S3 reports for this file uploaded by upload_file with these settings: the object's
    SHA-256, or for a multipart upload the SHA-256 of the parts' SHA-256s with a ``-<parts>`` suffix."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        if size < threshold:
            return base64.b64encode(hashlib.sha256(handle.read()).digest()).decode()
        digests = []
        while chunk := handle.read(part_size):
            digests.append(hashlib.sha256(chunk).digest())
    return base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode() + f"-{len(digests)}"


def upload_file(s3, path: str, bucket: str, key: str) -> dict[str, Any]:
    """Upload with a SHA-256 checksum (S3 verifies every part on receipt), then compare what S3 stored with
    the local file's checksum."""
    from boto3.s3.transfer import TransferConfig

    transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE,
                              max_concurrency=MAX_CONCURRENCY)
    s3.upload_file(path, bucket, key, ExtraArgs={"ChecksumAlgorithm": "SHA256"}, Config=transfer)
    head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    expected = sha256_checksums(path, MULTIPART_CHUNKSIZE, MULTIPART_THRESHOLD)
    stored = head.get("ChecksumSHA256")
    # S3 writes a composite checksum as "<base64>-<parts>"; compare the digest, whatever the suffix convention
    if stored is not None and stored.split("-")[0] != expected.split("-")[0]:
        raise CliError(f"s3://{bucket}/{key}: S3 reports SHA-256 {stored}, the local file has {expected}")
    if head["ContentLength"] != os.path.getsize(path):
        raise CliError(f"s3://{bucket}/{key}: {head['ContentLength']} bytes stored, {os.path.getsize(path)} sent")
    return {"key": key, "bytes": head["ContentLength"], "sha256": stored or expected}


# --------------------------------------------------------------------------------------------------
# Commands


def _load_and_report(args, seq_length: int, global_batch_size: int | None):
    """Validate the files and print the report; None when the data is bad (the report is on stderr)."""
    try:
        train, validation, reports = dataset.load_dataset(args.file, args.validation, seq_length, global_batch_size)
    except dataset.DatasetError as exc:
        print(exc, file=sys.stderr)
        return None
    for report in reports:
        print(report.render())
    return train, validation


def cmd_validate(args) -> int:
    defaults = stack_defaults(args.stack)
    loaded = _load_and_report(args, args.seq_length or defaults.seq_length, defaults.global_batch_size)
    if loaded is None:
        return 1
    train, validation = loaded
    print(f"{len(train)} training and {len(validation)} validation example(s)"
          + ("" if args.validation else " (validation split derived from the file)"))
    return 0


def cmd_upload(args) -> int:
    defaults = stack_defaults(args.stack)
    name = args.dataset or defaults.dataset or "default"
    if not _DATASET_NAME.fullmatch(name) or ".." in name:
        raise CliError(f"--dataset {name!r}: letters, digits, '.', '_', '-' only")
    loaded = _load_and_report(args, args.seq_length or defaults.seq_length, defaults.global_batch_size)
    if loaded is None:
        return 1
    train, validation = loaded
    s3 = s3_client()
    bucket = args.bucket or find_datasets_bucket(s3, stack_name(args.stack))
    with tempfile.TemporaryDirectory() as tmp:
        uploads = []
        for records, filename in ((train, dataset.TRAIN_FILE), (validation, dataset.VALIDATION_FILE)):
            local = os.path.join(tmp, filename)
            dataset.write_jsonl(local, records)
            uploads.append((local, f"{name}/{filename}", len(records)))
        for local, key, count in uploads:
            result = upload_file(s3, local, bucket, key)
            print(f"uploaded s3://{bucket}/{key}: {count} examples, {result['bytes']} bytes, sha256 {result['sha256']}")
    print(f"the training pods see it at /fsx/datasets/{name}/ (data.dataset: {name})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="check a JSONL dataset and print a report")
    validate.add_argument("file")
    validate.add_argument("--validation", help="a separate validation file (checked for overlap with FILE)")
    validate.add_argument("--seq-length", type=positive_integer, help="sequence length to estimate against")
    validate.add_argument("--stack", help="take the sequence length and global batch size from this stack's file "
                                          "(a name or a path)")
    validate.set_defaults(handler=cmd_validate)
    upload = sub.add_parser("upload", help="validate, split and upload to the stack's datasets bucket")
    upload.add_argument("file")
    upload.add_argument("--validation", help="a separate validation file; without it one is split off FILE")
    upload.add_argument("--stack", required=True, help="stack name (stacks/Pulumi.<stack>.yaml) or stack file path")
    upload.add_argument("--dataset", help="dataset name (default: the stack's data.dataset, else 'default')")
    upload.add_argument("--bucket", help="bucket name (default: found by the stack's tags)")
    upload.add_argument("--seq-length", type=positive_integer, help="sequence length to estimate against (default: the stack's)")
    upload.set_defaults(handler=cmd_upload)
    args = parser.parse_args(argv)
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        return args.handler(args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except NoCredentialsError:
        print(f"error: {NO_CREDENTIALS}", file=sys.stderr)
        return 1
    except (Boto3Error, BotoCoreError, ClientError) as exc:  # S3UploadFailedError is a Boto3Error
        print(f"error: AWS: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
