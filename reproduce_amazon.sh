#!/usr/bin/env bash
# The Amazon study: reproduce.sh with TASK amazon (bash reproduce_amazon.sh STEP is
# bash reproduce.sh amazon STEP; the commands of RESULTS.md use this name).
exec bash "$(dirname "$0")/reproduce.sh" amazon "$@"
