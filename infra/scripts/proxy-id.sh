#!/usr/bin/env bash
# Print an RDS Proxy's resource id (prx-...), the id that rds-db:connect ARNs use
# for connections through the proxy:
#   arn:aws:rds-db:REGION:ACCOUNT:dbuser:prx-.../USER
#
#   infra/scripts/proxy-id.sh --stack STACK_NAME
#   infra/scripts/proxy-id.sh PROXY_NAME
#
# The id is the last part of the proxy's ARN (arn:aws:rds:REGION:ACCOUNT:db-proxy:prx-...),
# which is how template.yaml derives it too.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=infra/scripts/_stack.sh
. "$here/_stack.sh"
need aws "AWS CLI v2"

case "${1:-}" in
  --stack)
    [ $# -eq 2 ] || die "usage: $0 --stack STACK_NAME | PROXY_NAME"
    id=$(stack_output "$2" ProxyId)
    [ -n "$id" ] || die "stack $2 has no RDS Proxy (deployed with UseRdsProxy=false?)"
    ;;
  "" | -*)
    die "usage: $0 --stack STACK_NAME | PROXY_NAME"
    ;;
  *)
    arn=$(aws rds describe-db-proxies --db-proxy-name "$1" \
      --query 'DBProxies[0].DBProxyArn' --output text)
    id=${arn##*:}
    ;;
esac
case "$id" in
  prx-*) echo "$id" ;;
  *) die "unexpected proxy id '$id'" ;;
esac
