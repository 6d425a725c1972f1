#!/bin/sh
# One shot: make the Redis nodes given as host:port one Redis Cluster of masters, the hash
# slots shared among them, unless they already are one (a restart of the stack): then it
# does nothing. Run by compose.scale.yaml's service redis-cluster with redis-cli on PATH.
#
#   create-cluster.sh redis-1:6379 redis-2:6379 redis-3:6379
set -eu

first=$1
if redis-cli -h "${first%:*}" -p "${first##*:}" cluster info | grep -q '^cluster_slots_assigned:16384'; then
    echo "already a cluster"
    exit 0
fi

# CLUSTER MEET takes addresses, not names: resolve them here. The nodes still announce their
# names to clients (cluster-preferred-endpoint-type hostname).
addresses=""
for node in "$@"; do
    host=${node%:*}
    address=$(getent hosts "$host" | cut -d ' ' -f 1 | head -n 1)
    addresses="$addresses ${address:-$host}:${node##*:}"
done
# shellcheck disable=SC2086 # one word per node
redis-cli --cluster create $addresses --cluster-replicas 0 --cluster-yes
