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
}

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

    def __init__(self, template: dict[str, Any], parameters: dict[str, str]) -> None:
        self.template = template
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
            "AWS::Region": REGION,
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


def render(transformed: dict[str, Any], **parameters: str) -> Rendered:
    return Rendered(transformed, {**NETWORK, **parameters})


# --- cfn-lint ------------------------------------------------------------------------


def test_template_passes_cfn_lint_including_informational_checks() -> None:
    matches = lint_file(
        TEMPLATE,
        ManualArgs(regions=["us-east-1", "eu-west-1", "ap-southeast-2"], include_checks=["I"]),
    )
    assert [f"{m.rule.id} line {m.linenumber}: {m.message}" for m in matches] == []


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
    assert counts["AWS::Lambda::Function"] == 4
    assert counts["AWS::Lambda::Version"] == 4
    assert counts["AWS::Lambda::Alias"] == 4
    assert not any(t.startswith("AWS::Serverless::") for t in counts)

    stack = render(transformed)
    functions = stack.functions()
    assert set(functions) == set(SAMPLES)
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


def test_powertools_layer_matches_region_runtime_and_architecture(
    transformed: dict[str, Any],
) -> None:
    assert "Layers" not in render(transformed).functions()["PowertoolsFunction"]
    stack = render(transformed, UsePowertoolsLayer="true", Architecture="arm64")
    functions = stack.functions()
    assert functions["PowertoolsFunction"]["Layers"] == [
        f"arn:aws:lambda:{REGION}:017000801446:layer:AWSLambdaPowertoolsPythonV3-python312-arm64:27"
    ]
    assert all("Layers" not in functions[name] for name in SAMPLES if name != "PowertoolsFunction")


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


def test_functions_deploy_the_four_sample_folders(sam_template: dict[str, Any]) -> None:
    code = {
        name: res["Properties"]["CodeUri"]
        for name, res in sam_template["Resources"].items()
        if res["Type"] == "AWS::Serverless::Function"
    }
    assert code == SAMPLES
    assert sam_template["Globals"]["Function"]["Handler"] == "app.handler"


@pytest.mark.parametrize("folder", sorted(SAMPLES.values()))
def test_sample_folder_has_the_handler_and_requirements_the_template_names(folder: str) -> None:
    path = ROOT / folder
    if not path.is_dir():
        pytest.skip(f"{folder} is not written yet (owned by the samples' author)")
    source = (path / "app.py").read_text()
    assert re.search(r"^(async )?def handler\(|^handler\s*=", source, re.MULTILINE), (
        f"{folder}app.py defines no module-level 'handler'"
    )
    requirements = (path / "requirements.txt").read_text()
    assert "lambda-pool" in requirements


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
    import shutil
    import uuid
    from urllib.parse import unquote, urlsplit

    import psycopg

    psql = shutil.which("psql") or next(
        iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"))), None
    )
    if psql is None:
        pytest.skip("needs the psql client (apt-get install postgresql-client)")
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
