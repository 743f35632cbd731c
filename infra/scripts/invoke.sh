#!/usr/bin/env bash
# Invoke one of the deployed sample functions through its 'live' alias and print
# the response and the end of its log.
#
#   infra/scripts/invoke.sh STACK_NAME [psycopg|sqlalchemy|async|powertools] [JSON_PAYLOAD]
#
# Defaults: the psycopg sample, payload {}.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=infra/scripts/_stack.sh
. "$here/_stack.sh"
need aws "AWS CLI v2"
need base64 "coreutils"

if [ $# -lt 1 ] || [ $# -gt 3 ]; then
  die "usage: $0 STACK_NAME [psycopg|sqlalchemy|async|powertools] [JSON_PAYLOAD]"
fi
stack=$1
sample=${2:-psycopg}
payload=${3:-"{}"}
case "$sample" in
  psycopg) key=PsycopgFunctionArn ;;
  sqlalchemy) key=SqlAlchemyFunctionArn ;;
  async) key=AsyncFunctionArn ;;
  powertools) key=PowertoolsFunctionArn ;;
  *) die "unknown sample '$sample' (psycopg, sqlalchemy, async or powertools)" ;;
esac
arn=$(stack_output "$stack" "$key")
[ -n "$arn" ] || die "stack $stack has no output $key"

out=$(mktemp)
trap 'rm -f "$out"' EXIT
# The alias, not $LATEST: SnapStart only applies to published versions.
meta=$(aws lambda invoke --function-name "$arn" --qualifier live \
  --cli-binary-format raw-in-base64-out --payload "$payload" \
  --log-type Tail --query '[StatusCode, FunctionError, LogResult]' --output text "$out")
read -r status error log <<<"$meta"
echo "--- log (last 4 KB) ---"
echo "$log" | base64 -d
echo "--- response (HTTP $status) ---"
cat "$out"
echo
[ "$error" = None ] || { echo "function error: $error" >&2; exit 1; }
