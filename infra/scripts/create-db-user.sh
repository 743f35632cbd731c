#!/usr/bin/env bash
# Create the database user the deployed functions log in as (infra/database.sql).
#
#   infra/scripts/create-db-user.sh STACK_NAME
#
# The stack's parameters decide the mode:
#   AuthMode=iam without RDS Proxy      -> the user gets rds_iam (IAM tokens only);
#   AuthMode=secret, or UseRdsProxy=true -> the user gets the password stored in the
#                                          stack's secret (RDS Proxy logs in with it).
# Where the SQL runs:
#   - the Aurora cluster the stack created: through the RDS Data API, as the master
#     user (its secret is managed by RDS), so no host inside the VPC is needed;
#   - an existing database: psql to DatabaseEndpoint, run from a host that can reach
#     it, as an admin user given by the usual libpq variables (PGUSER, PGPASSWORD or
#     ~/.pgpass). Set DB_HOST to override the host (e.g. an SSH tunnel's localhost).
#   - USE_PSQL=1 takes the psql path for the created cluster too (from a host in the
#     VPC); the admin credentials then come from the cluster's master secret.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=infra/scripts/_stack.sh
. "$here/_stack.sh"

[ $# -eq 1 ] || die "usage: $0 STACK_NAME"
stack=$1
need aws "AWS CLI v2"
need python3 "to read the secret's JSON"

user=$(stack_parameter "$stack" DatabaseUser)
dbname=$(stack_parameter "$stack" DatabaseName)
auth_mode=$(stack_parameter "$stack" AuthMode)
use_proxy=$(stack_parameter "$stack" UseRdsProxy)
[ -n "$user" ] || die "stack $stack has no DatabaseUser parameter: is it a lambda-pool stack?"
[[ "$user" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "unexpected user name '$user'"

if [ "$auth_mode" = secret ] || [ "$use_proxy" = true ]; then
  auth=password
  secret_arn=$(stack_output "$stack" AppUserSecretArn)
  [ -n "$secret_arn" ] || die "stack $stack has no AppUserSecretArn output"
  password=$(aws secretsmanager get-secret-value --secret-id "$secret_arn" \
    --query SecretString --output text |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["password"])')
else
  auth=iam
  password=
fi

cluster_arn=$(stack_output "$stack" ClusterArn)
master_secret=$(stack_output "$stack" MasterUserSecretArn)
if [ -n "$cluster_arn" ] && [ -z "${USE_PSQL:-}" ]; then
  # RDS Data API: one statement per call, no psql meta-commands, so the same steps
  # as infra/database.sql are spelled out here.
  run() {
    aws rds-data execute-statement --resource-arn "$cluster_arn" \
      --secret-arn "$master_secret" --database "$dbname" --sql "$1" >/dev/null
  }
  q="\"$user\""
  run "DO \$\$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$user') THEN CREATE ROLE $q LOGIN; END IF; END \$\$"
  if [ "$auth" = iam ]; then
    run "GRANT rds_iam TO $q"
  else
    run "DO \$\$ BEGIN IF pg_has_role('$user', 'rds_iam', 'MEMBER') THEN REVOKE rds_iam FROM $q; END IF; END \$\$"
    run "ALTER ROLE $q PASSWORD '${password//\'/\'\'}'"
  fi
  run "ALTER ROLE $q SET idle_in_transaction_session_timeout = '60s'"
  run "GRANT CONNECT ON DATABASE \"$dbname\" TO $q"
  run "GRANT USAGE, CREATE ON SCHEMA public TO $q"
  run "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO $q"
  run "GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO $q"
  run "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO $q"
  run "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO $q"
  echo "database user \"$user\" ready for $auth authentication in \"$dbname\" (Data API)"
else
  need psql "PostgreSQL client"
  host=${DB_HOST:-$(stack_output "$stack" DatabaseEndpoint)}
  port=${DB_PORT:-$(stack_parameter "$stack" DatabasePort)}
  if [ -n "$master_secret" ] && [ -z "${PGPASSWORD:-}" ]; then
    master_json=$(aws secretsmanager get-secret-value --secret-id "$master_secret" \
      --query SecretString --output text)
    PGUSER=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["username"])' <<<"$master_json")
    PGPASSWORD=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["password"])' <<<"$master_json")
    export PGUSER PGPASSWORD
  fi
  # The password goes in on standard input, not on the command line.
  {
    if [ "$auth" = password ]; then
      escaped=${password//\\/\\\\}
      printf "\\\\set app_password '%s'\n" "${escaped//\'/\\\'}"
    fi
    cat "$here/../database.sql"
  } | psql "host=$host port=$port dbname=$dbname sslmode=require" \
    -v app_user="$user" -v auth="$auth" -f -
fi
