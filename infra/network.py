"""The VPC: a new one over two or three zones, or an existing one named in config."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Mapping

import pulumi
import pulumi_aws as aws

from infra.config import NetworkConfig

# Tags the AWS Load Balancer Controller and the in-tree service controller use to pick subnets.
PUBLIC_SUBNET_TAGS = {"kubernetes.io/role/elb": "1"}
PRIVATE_SUBNET_TAGS = {"kubernetes.io/role/internal-elb": "1"}


@dataclass(frozen=True)
class SubnetPlan:
    zone: str
    private_cidr: str
    public_cidr: str


def subnet_layout(vpc_cidr: str, zones: tuple[str, ...]) -> tuple[SubnetPlan, ...]:
    """Carve the VPC: each zone's private subnet is a quarter of it (pods take VPC addresses, so the nodes'
    subnets must be large), and the public subnets, which hold only NAT gateways and load balancers, share
    the last quarter in sixteenths."""
    net = ipaddress.IPv4Network(vpc_cidr)
    quarters = list(net.subnets(prefixlen_diff=2))
    publics = list(quarters[3].subnets(prefixlen_diff=2))
    return tuple(SubnetPlan(zone, str(quarters[i]), str(publics[i])) for i, zone in enumerate(zones))


@dataclass(frozen=True)
class NetworkArgs:
    config: NetworkConfig
    prefix: str
    cluster_name: str
    region: str
    tags: Mapping[str, str]


class Network(pulumi.ComponentResource):
    """Outputs ``vpc_id``, ``private_subnet_ids`` and ``public_subnet_ids`` as zone -> id maps."""

    vpc_id: pulumi.Output[str]
    private_subnet_ids: Mapping[str, pulumi.Input[str]]
    public_subnet_ids: Mapping[str, pulumi.Input[str]]

    def __init__(self, name: str, args: NetworkArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("nemo-eks:infra:Network", name, None, opts)
        cfg = args.config
        if cfg.uses_existing_vpc:
            self.vpc_id = pulumi.Output.from_input(cfg.existing_vpc_id)
            self.private_subnet_ids = dict(cfg.existing_private_subnet_ids)
            self.public_subnet_ids = dict(cfg.existing_public_subnet_ids)
        else:
            self._create(args)
        self.register_outputs({"vpcId": self.vpc_id, "privateSubnetIds": self.private_subnet_ids,
                               "publicSubnetIds": self.public_subnet_ids})

    def _create(self, args: NetworkArgs) -> None:
        cfg, tags, name = args.config, dict(args.tags), args.prefix
        child = pulumi.ResourceOptions(parent=self)
        cluster_tag = {f"kubernetes.io/cluster/{args.cluster_name}": "shared"}
        vpc = aws.ec2.Vpc(f"{name}-vpc", cidr_block=cfg.vpc_cidr, enable_dns_hostnames=True, enable_dns_support=True,
                          tags={**tags, "Name": args.prefix}, opts=child)
        igw = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=vpc.id, tags={**tags, "Name": args.prefix}, opts=child)
        public_rt = aws.ec2.RouteTable(f"{name}-public", vpc_id=vpc.id, tags={**tags, "Name": f"{args.prefix}-public"},
                                       opts=child)
        aws.ec2.Route(f"{name}-public-default", route_table_id=public_rt.id, destination_cidr_block="0.0.0.0/0",
                      gateway_id=igw.id, opts=child)

        self.public_subnet_ids, self.private_subnet_ids = {}, {}
        private_route_tables = []
        nat_ids: list[pulumi.Output[str]] = []
        for plan in subnet_layout(cfg.vpc_cidr, cfg.availability_zones):
            public = aws.ec2.Subnet(f"{name}-public-{plan.zone}", vpc_id=vpc.id, availability_zone=plan.zone,
                                    cidr_block=plan.public_cidr, map_public_ip_on_launch=True,
                                    tags={**tags, **PUBLIC_SUBNET_TAGS, **cluster_tag, "Name": f"{args.prefix}-public-{plan.zone}"},
                                    opts=child)
            aws.ec2.RouteTableAssociation(f"{name}-public-{plan.zone}-rt-link", subnet_id=public.id,
                                          route_table_id=public_rt.id, opts=child)
            private = aws.ec2.Subnet(f"{name}-private-{plan.zone}", vpc_id=vpc.id, availability_zone=plan.zone,
                                     cidr_block=plan.private_cidr,
                                     tags={**tags, **PRIVATE_SUBNET_TAGS, **cluster_tag, "Name": f"{args.prefix}-private-{plan.zone}"},
                                     opts=child)
            # One NAT gateway is cheaper; one per zone keeps the other zones online when a zone fails.
            if cfg.nat_gateways == "perAz" or not nat_ids:
                eip = aws.ec2.Eip(f"{name}-nat-{plan.zone}-ip", domain="vpc", tags={**tags, "Name": f"{args.prefix}-nat-{plan.zone}"},
                                  opts=child)
                nat = aws.ec2.NatGateway(f"{name}-nat-{plan.zone}", subnet_id=public.id, allocation_id=eip.id,
                                         tags={**tags, "Name": f"{args.prefix}-nat-{plan.zone}"},
                                         opts=pulumi.ResourceOptions(parent=self, depends_on=[igw]))
                nat_ids.append(nat.id)
            route_table = aws.ec2.RouteTable(f"{name}-private-{plan.zone}-rt", vpc_id=vpc.id,
                                             tags={**tags, "Name": f"{args.prefix}-private-{plan.zone}"}, opts=child)
            aws.ec2.Route(f"{name}-private-{plan.zone}-default", route_table_id=route_table.id,
                          destination_cidr_block="0.0.0.0/0", nat_gateway_id=nat_ids[-1], opts=child)
            aws.ec2.RouteTableAssociation(f"{name}-private-{plan.zone}-rt-link", subnet_id=private.id,
                                          route_table_id=route_table.id, opts=child)
            private_route_tables.append(route_table.id)
            self.public_subnet_ids[plan.zone] = public.id
            self.private_subnet_ids[plan.zone] = private.id

        # Datasets and checkpoints move between the nodes and S3 in terabytes: a gateway endpoint keeps that
        # traffic off the NAT gateways (no per-GB charge) at no cost of its own.
        aws.ec2.VpcEndpoint(f"{name}-s3", vpc_id=vpc.id, service_name=f"com.amazonaws.{args.region}.s3",
                            vpc_endpoint_type="Gateway", route_table_ids=private_route_tables,
                            tags={**tags, "Name": f"{args.prefix}-s3"}, opts=child)
        self.vpc_id = vpc.id
