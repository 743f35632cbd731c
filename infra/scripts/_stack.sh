# shellcheck shell=bash
# Helpers shared by the scripts in this folder (sourced, not run).
# Reads outputs and parameters of a deployed lambda-pool stack with the AWS CLI.

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

need() {
  command -v "$1" >/dev/null 2>&1 || die "needs '$1' on PATH ($2)"
}

# stack_output STACK KEY -> value, or nothing when the stack has no such output.
stack_output() {
  aws cloudformation describe-stacks --stack-name "$1" \
    --query "Stacks[0].Outputs[?OutputKey=='$2'].OutputValue | [0]" --output text |
    sed 's/^None$//'
}

# stack_parameter STACK KEY -> value the stack was deployed with.
stack_parameter() {
  aws cloudformation describe-stacks --stack-name "$1" \
    --query "Stacks[0].Parameters[?ParameterKey=='$2'].ParameterValue | [0]" --output text |
    sed 's/^None$//'
}
