#!/usr/bin/env bash
# Make sure redis-server is installed (apt) and a Redis answers on 127.0.0.1:6379 (start one if none does).
set -euo pipefail
answers() { (exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && head -c 5 <&3 | grep -q PONG) 2>/dev/null; }
# the binary is needed even when a Redis already answers: the fault tests start private servers
if ! command -v redis-server >/dev/null; then
  echo "redis: redis-server missing, installing it with apt-get"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
if answers; then echo "redis: answering on 127.0.0.1:6379"; exit 0; fi
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
  --dir /tmp --logfile /tmp/deltaserve-redis.log
for _ in $(seq 50); do answers && { echo "redis: started on 127.0.0.1:6379"; exit 0; }; sleep 0.1; done
echo "redis: could not start a server on 127.0.0.1:6379 (see /tmp/deltaserve-redis.log)" >&2
exit 1
