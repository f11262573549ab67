#!/bin/bash
# Submit the registration array and a merge job that starts once every task has succeeded:
#   bash examples/cluster/submit.sh MANIFEST OUT
set -euo pipefail
manifest=$1
out=$2
here=$(dirname "$0")
job=$(sbatch --parsable "$here/register_array.sbatch" "$manifest" "$out")
sbatch --dependency=afterok:"$job" --job-name=groupmorph-merge --wrap "groupmorph merge $out"
