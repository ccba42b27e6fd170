#!/bin/bash
# usage (in the project environment): MODE=open|destroy|drain ./loop.sh N — N four-process launches; counts hangs (60 s) and failed exits
cd "$(dirname "$0")"
hangs=0; fails=0
for i in $(seq "$1"); do
  timeout 60 torchrun --standalone --nproc_per_node 4 teardown.py > /tmp/teardown.$i.log 2>&1; rc=$?
  if [ $rc = 124 ]; then hangs=$((hangs + 1)); elif [ $rc != 0 ]; then fails=$((fails + 1)); fi
done
echo "MODE=$MODE launches=$1 hangs=$hangs failed=$fails"
