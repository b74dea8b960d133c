"""tools.data against a real S3 API: a moto server started here on 127.0.0.1, reached through AWS_ENDPOINT_URL as
the CLI would reach AWS."""

from __future__ import annotations

import base64
import hashlib
import json

import boto3
import pytest

from tools import data, synth

STACK = "dev"  # a real stack file: the CLI takes its dataset name ("default") and sequence length from it


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    for key, value in {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    client = boto3.client("s3")
    yield client
    for bucket in client.list_buckets()["Buckets"]:  # a clean account for the next test
        for obj in client.list_objects_v2(Bucket=bucket["Name"]).get("Contents", []):
            client.delete_object(Bucket=bucket["Name"], Key=obj["Key"])
        client.delete_bucket(Bucket=bucket["Name"])


def make_bucket(s3, name, stack=STACK, role="datasets"):
    s3.create_bucket(Bucket=name)
    s3.put_bucket_tagging(Bucket=name, Tagging={"TagSet": [
        {"Key": "project", "Value": "nemo-eks"}, {"Key": "stack", "Value": stack},
        {"Key": "nemo-eks/data", "Value": role}]})
    return name


def write_examples(path, count, start=0, pad=0):
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(start, start + count):
            handle.write(json.dumps({"input": f"question {i} " + "x" * pad, "output": f"answer {i}"}) + "\n")
    return str(path)


def objects(s3, bucket):
    return {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}


def lines(s3, bucket, key):
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines()]


def test_upload_finds_the_stack_bucket_by_tags_and_splits(s3, tmp_path, capsys):
    make_bucket(s3, "other-stack-datasets", stack="prod")
    make_bucket(s3, "dev-checkpoints", role="checkpoints")
    bucket = make_bucket(s3, "dev-datasets")
    source = write_examples(tmp_path / "all.jsonl", 200)
    assert data.main(["upload", source, "--stack", STACK]) == 0
    assert set(objects(s3, bucket)) == {"default/train.jsonl", "default/validation.jsonl"}
    assert objects(s3, "other-stack-datasets") == {} and objects(s3, "dev-checkpoints") == {}
    train, validation = lines(s3, bucket, "default/train.jsonl"), lines(s3, bucket, "default/validation.jsonl")
    # one global batch of the stack's (128, the default): 5% of 200 would be too few for NeMo ever to validate
    assert len(train) + len(validation) == 200 and len(validation) == data.stack_defaults(STACK).global_batch_size
    assert not {r["input"] for r in train} & {r["input"] for r in validation}
    assert "uploaded s3://dev-datasets/default/train.jsonl" in capsys.readouterr().out
    # the same file gives the same split: a re-upload does not move examples between the two sets
    assert data.main(["upload", source, "--stack", STACK]) == 0
    assert lines(s3, bucket, "default/validation.jsonl") == validation


def test_upload_stores_a_sha256_checksum(s3, tmp_path):
    bucket = make_bucket(s3, "dev-datasets")
    assert data.main(["upload", write_examples(tmp_path / "a.jsonl", 200), "--stack", STACK]) == 0
    head = s3.head_object(Bucket=bucket, Key="default/train.jsonl", ChecksumMode="ENABLED")
    body = s3.get_object(Bucket=bucket, Key="default/train.jsonl")["Body"].read()
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(body).digest()).decode()


def test_large_files_go_up_in_parts(s3, tmp_path, monkeypatch):
    part = 5 * 1024 * 1024  # S3's smallest part
    monkeypatch.setattr(data, "MULTIPART_THRESHOLD", part)
    monkeypatch.setattr(data, "MULTIPART_CHUNKSIZE", part)
    bucket = make_bucket(s3, "dev-datasets")
    source = write_examples(tmp_path / "big.jsonl", 12_000, pad=1000)  # ~12 MB -> 3 parts
    assert data.main(["upload", source, "--stack", STACK]) == 0
    head = s3.head_object(Bucket=bucket, Key="default/train.jsonl", ChecksumMode="ENABLED")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload's ETag names its part count
    body = s3.get_object(Bucket=bucket, Key="default/train.jsonl")["Body"].read()
    assert len(body.splitlines()) == 12_000 - 600


def test_upload_with_a_given_validation_file_and_bucket(s3, tmp_path):
    s3.create_bucket(Bucket="untagged")
    train = write_examples(tmp_path / "train.jsonl", 30)
    validation = write_examples(tmp_path / "validation.jsonl", 128, start=1000)  # one global batch of the stack
    assert data.main(["upload", train, "--validation", validation, "--stack", STACK, "--bucket", "untagged",
                      "--dataset", "support-v2"]) == 0
    assert len(lines(s3, "untagged", "support-v2/train.jsonl")) == 30
    assert [r["input"] for r in lines(s3, "untagged", "support-v2/validation.jsonl")][0].startswith("question 1000")


def test_a_bad_file_uploads_nothing(s3, tmp_path, capsys):
    bucket = make_bucket(s3, "dev-datasets")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{"input": "a"}\n{"input": "c", "output": "d"}\n')
    assert data.main(["upload", str(bad), "--stack", STACK]) == 1
    assert objects(s3, bucket) == {}
    err = capsys.readouterr().err
    assert "missing field 'output': 1 line(s): 2" in err and "INVALID" in err


def test_overlap_between_training_and_validation_uploads_nothing(s3, tmp_path, capsys):
    bucket = make_bucket(s3, "dev-datasets")
    train = write_examples(tmp_path / "train.jsonl", 10)
    validation = write_examples(tmp_path / "validation.jsonl", 3, start=8)  # 8 and 9 are training examples
    assert data.main(["upload", train, "--validation", validation, "--stack", STACK]) == 1
    assert objects(s3, bucket) == {}
    assert "duplicate of an earlier example: 2 line(s): 1, 2" in capsys.readouterr().err


def test_unknown_stack_bucket_is_an_error(s3, tmp_path, capsys):
    make_bucket(s3, "dev-datasets")
    stack_file = tmp_path / "Pulumi.nosuch.yaml"  # a valid stack that was never deployed
    stack_file.write_text((synth.STACKS_DIR / "Pulumi.dev.yaml").read_text())
    assert data.main(["upload", write_examples(tmp_path / "a.jsonl", 200), "--stack", str(stack_file)]) == 1
    err = capsys.readouterr().err
    assert "no S3 bucket tagged project=nemo-eks, stack=nosuch" in err and "--bucket" in err
    assert objects(s3, "dev-datasets") == {}


def test_two_tagged_buckets_are_ambiguous(s3, tmp_path, capsys):
    make_bucket(s3, "dev-datasets-a")
    make_bucket(s3, "dev-datasets-b")
    assert data.main(["upload", write_examples(tmp_path / "a.jsonl", 200), "--stack", STACK]) == 1
    assert "dev-datasets-a, dev-datasets-b" in capsys.readouterr().err


def test_a_missing_bucket_is_reported_not_raised(s3, tmp_path, capsys):
    assert data.main(["upload", write_examples(tmp_path / "a.jsonl", 200), "--stack", STACK,
                      "--bucket", "does-not-exist"]) == 1
    assert "error: AWS:" in capsys.readouterr().err


def test_validate_reports_line_numbers(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n[1, 2]\n{"input": 3, "output": "x"}\n')
    assert data.main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "not a JSON object: 1 line(s): 2" in err and "field 'input' is not a string: 1 line(s): 3" in err
    good = write_examples(tmp_path / "good.jsonl", 20)
    assert data.main(["validate", good, "--seq-length", "4096"]) == 0
    assert "19 training and 1 validation example(s)" in capsys.readouterr().out


def test_the_example_dataset_uploads_as_the_stack_reads_it(s3, capsys):
    bucket = make_bucket(s3, "dev-datasets")
    example = synth.ROOT / "examples" / "data" / "train.jsonl"
    assert data.main(["upload", str(example), "--stack", STACK]) == 0
    train, validation = lines(s3, bucket, "default/train.jsonl"), lines(s3, bucket, "default/validation.jsonl")
    # one global batch of the stack (128), split by content hash: 5% of 371 (19) would never validate
    assert (len(train), len(validation)) == (243, 128)
    assert all(set(r) == {"input", "output"} for r in train + validation)


def test_a_validation_file_smaller_than_the_stacks_global_batch_is_refused(tmp_path, capsys):
    train = write_examples(tmp_path / "train.jsonl", 200)
    validation = write_examples(tmp_path / "validation.jsonl", 19, start=1000)
    assert data.main(["validate", train, "--validation", validation, "--stack", STACK]) == 1
    err = capsys.readouterr().err
    assert "19 validation example(s), fewer than one global batch (nemo-eks:training.globalBatchSize = 128)" in err
    assert data.main(["validate", train, "--validation", validation]) == 0  # no stack: no global batch to hold
