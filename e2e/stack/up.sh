#!/usr/bin/env bash
# Starts real Redis, Apache Kafka (KRaft, single node) and Apache Cassandra 5.0 on
# loopback, each with its own free ports and data dir under a state dir, and waits
# until each one answers. Stop everything with e2e/stack/down.sh <state dir>.
#
#   up.sh [options] [STATE_DIR]        (or PARLEY_STACK_DIR; default /tmp/parley-stack)
#     --only LIST      comma list of engines: redis,kafka,cassandra (default: all three), and
#                      redis-cluster (three Redis masters in cluster mode, slots spread over them)
#     --dc2            also start a second Cassandra node on 127.0.0.2 in datacenter dc2
#     --kafka2         also start a second, independent Kafka broker (cluster "B")
#     --mm2            start MirrorMaker 2 replicating Kafka A -> B (implies --kafka2)
#     --region2        a second region's engines, for each engine of --only: a second, independent Redis
#                      (same TLS and ACL user; PARLEY_REDIS_B_URL), the second Kafka (as --kafka2) and
#                      Cassandra dc2 (as --dc2). MirrorMaker 2 is installed, not started: see bin/mm2-run
#     --toxiproxy      also start a Toxiproxy server (its API on a free loopback port: PARLEY_TOXIPROXY_URL)
#     --kafka-wan      (implies --toxiproxy) give each Kafka a second SASL_SSL listener `WAN`, advertised at a
#                      Toxiproxy proxy in front of it (proxies kafka-wan, kafka-b-wan; no toxics), so a client that
#                      bootstraps there (PARLEY_KAFKA_WAN_BOOTSTRAP, PARLEY_KAFKA_B_WAN_BOOTSTRAP) is told to
#                      reconnect through the proxy too: add latency toxics to them to put a WAN between regions
#
#   Environment: PARLEY_CACHE (as for install.sh), STACK_NICE (niceness of the engines,
#   default 0), STACK_TIMEOUT (seconds per engine, default 180),
#   STACK_KAFKA_HEAP (default 512m), STACK_CASSANDRA_HEAP (default 1G),
#   CASSANDRA_JAVA (a JDK 17 java; found automatically), KAFKA_JAVA (default: java),
#   STACK_KEEP_ON_FAIL=1 (leave engines running when one fails to start; default: stop them),
#   TOXIPROXY_VERSION (default v2.5.0, as install.sh builds it).
#
# Writes $STATE/stack.env (PARLEY_REDIS_URL, PARLEY_KAFKA_BOOTSTRAP, PARLEY_CASSANDRA_CONTACT,
# PARLEY_CASSANDRA_DC, and with the options PARLEY_CASSANDRA_CONTACT_DC2,
# PARLEY_KAFKA_B_BOOTSTRAP, PARLEY_REDIS_B_URL, PARLEY_TOXIPROXY_URL, PARLEY_KAFKA_WAN_BOOTSTRAP,
# PARLEY_KAFKA_WAN_PROXY, PARLEY_KAFKA_B_WAN_BOOTSTRAP, PARLEY_KAFKA_B_WAN_PROXY) and helper commands in $STATE/bin:
#   Kafka listens with SASL_SSL (SCRAM-SHA-512, user parley) and Cassandra with TLS and PasswordAuthenticator
#   (role parley); stack.env names the CA and the credentials (PARLEY_KAFKA_TLS_CA_FILE,
#   PARLEY_KAFKA_SASL_USERNAME/PASSWORD, PARLEY_CASSANDRA_TLS_CA_FILE, PARLEY_CASSANDRA_USERNAME/PASSWORD) and
#   PARLEY_KAFKA_CLIENT_PROPERTIES, the Java clients' properties (--command-config of the Kafka tools).
#   kafka-run CLASS ARGS...   run a Kafka tool class (e.g. org.apache.kafka.tools.TopicCommand)
#   cql [-h host] [-p port] [--dc DC] STATEMENT...   run CQL over TLS as role parley, print rows (python driver)
#   nodetool [-p JMX_PORT] ARGS...                    Cassandra's nodetool over local JMX
#   redis-cli [-p PORT] ARGS...                       redis-cli over TLS as the stack's Redis ACL user
#   mm2-run MM2_PROPERTIES [--clusters ALIAS...]      MirrorMaker 2 (dedicated mode) in the foreground, with the
#                                                     cached connect-mirror jars; logs to stdout (PARLEY_MM2_RUN)
#   toxiproxy-cli ARGS...                             Toxiproxy's CLI against the stack's server (--toxiproxy)
# Exit status 0 once every engine asked for is ready; 1 (with the engine's name and log
# file) otherwise.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${PARLEY_CACHE:-$HOME/.cache/parley}/stack"
ONLY="redis,kafka,cassandra"
DC2=0; KAFKA2=0; MM2=0; REGION2=0; TOXIPROXY=0; KAFKA_WAN=0; STATE=""
while (($#)); do
  case "$1" in
    --only) ONLY="$2"; shift 2 ;;
    --only=*) ONLY="${1#--only=}"; shift ;;
    --dc2) DC2=1; shift ;;
    --kafka2) KAFKA2=1; shift ;;
    --mm2) MM2=1; KAFKA2=1; shift ;;
    --region2) REGION2=1; KAFKA2=1; DC2=1; shift ;;
    --toxiproxy) TOXIPROXY=1; shift ;;
    --kafka-wan) KAFKA_WAN=1; TOXIPROXY=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "up.sh: unknown option $1" >&2; exit 2 ;;
    *) STATE="$1"; shift ;;
  esac
done
STATE="${STATE:-${PARLEY_STACK_DIR:-/tmp/parley-stack}}"
NICE="${STACK_NICE:-0}"
TIMEOUT="${STACK_TIMEOUT:-180}"
want() { [[ ",$ONLY," == *",$1,"* ]]; }
for e in ${ONLY//,/ }; do
  case "$e" in redis|redis-cluster|kafka|cassandra) ;; *) echo "up.sh: unknown engine '$e' (redis,redis-cluster,kafka,cassandra)" >&2; exit 2 ;; esac
done
want cassandra || DC2=0
want kafka || { KAFKA2=0; MM2=0; KAFKA_WAN=0; }
REDIS2=0; if ((REGION2)) && want redis; then REDIS2=1; fi

log() { printf '[stack-up %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  printf '[stack-up] ERROR: %s\n' "$*" >&2
  if [[ -n "${LAUNCHED:-}" && "${STACK_KEEP_ON_FAIL:-0}" != 1 ]]; then
    log "stopping what was started (logs stay in $STATE; STACK_KEEP_ON_FAIL=1 keeps the engines running)"
    "$HERE/down.sh" "$STATE" >&2 || true
  fi
  exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
PIDS="$STATE/pids"
mkdir -p "$PIDS" "$STATE/bin"

# Refuse to start over a live stack.
for f in "$PIDS"/*.pid; do
  [[ -e "$f" ]] || continue
  read -r pid _ <"$f" || true
  if [[ -n "${pid:-}" ]] && kill -0 "$pid" 2>/dev/null; then
    die "a stack is already running in $STATE ($(basename "$f" .pid) pid $pid); run e2e/stack/down.sh $STATE first"
  fi
  rm -f "$f"
done

# Install (no-op when cached).
parts=""
{ want redis || want redis-cluster; } && parts+="redis,"
want kafka && parts+="kafka,"
# MirrorMaker 2 with any second Kafka: --mm2 runs it, and a --region2 (or --kafka2) test runs it through bin/mm2-run.
((KAFKA2)) && parts+="mm2,"
want cassandra && parts+="cassandra,cql,"
((TOXIPROXY)) && parts+="toxiproxy,"
STACK_ONLY="${parts%,}" "$HERE/install.sh"

KAFKA_LIB="$CACHE/kafka/broker/lib"
MM2_LIB="$CACHE/kafka/mm2/lib"
CASS_LIB="$CACHE/cassandra/lib"
PY="$CACHE/cql/venv/bin/python"

# ---------------------------------------------------------------------------
# ports: random ports in 15000-32000 (below the ephemeral range), bindable on
# 127.0.0.1 (and on 127.0.0.2 when the second Cassandra node needs the same port).
USED_PORTS=""
free_port() { # [extra address]
  local p
  p=$(python3 - "$USED_PORTS" "$@" <<'EOF'
import random, socket, sys
used = set(int(x) for x in sys.argv[1].split() if x)
addrs = ["127.0.0.1"] + sys.argv[2:]
for _ in range(500):
    p = random.randint(15000, 32000)
    if p in used:
        continue
    socks = []
    try:
        for a in addrs:
            s = socket.socket(); socks.append(s); s.bind((a, p))
    except OSError:
        continue
    finally:
        for s in socks: s.close()
    print(p); break
else:
    sys.exit("no free port")
EOF
) || die "could not find a free port"
  USED_PORTS+=" $p"; echo "$p"
}

# start NAME LOGFILE CMD...: run CMD in its own session (so down.sh can kill the
# whole process group); pid file holds "pid starttime" to guard against pid reuse.
start() {
  local name=$1 logf=$2; shift 2
  setsid bash -c 'echo "$$ $(cut -d" " -f22 /proc/$$/stat)" >"$0"; exec "$@"' \
    "$PIDS/$name.pid" nice -n "$NICE" "$@" </dev/null >"$logf" 2>&1 &
  local i
  for i in $(seq 50); do [[ -s "$PIDS/$name.pid" ]] && break; sleep 0.1; done
  LAUNCHED=1
  STARTED_AT[$name]=$(now)
  LOGS[$name]=$logf
}
alive() { local pid; read -r pid _ <"$PIDS/$1.pid" 2>/dev/null && kill -0 "$pid" 2>/dev/null; }
declare -A STARTED_AT LOGS READY_S

# wait_ready NAME CHECK...: poll CHECK until it succeeds; fail with the log's tail if
# the engine dies or the timeout passes.
wait_ready() {
  local name=$1; shift
  local deadline=$(( $(date +%s) + TIMEOUT ))
  while true; do
    if "$@" >/dev/null 2>&1; then
      local label=${WAIT_LABEL:-$name}
      READY_S[$label]=$(since "${STARTED_AT[$name]}")
      log "$label ready in ${READY_S[$label]}s after launch"
      return 0
    fi
    if ! alive "$name"; then
      tail -n 30 "${LOGS[$name]}" >&2 || true
      die "$name exited before becoming ready; log: ${LOGS[$name]}"
    fi
    if (( $(date +%s) > deadline )); then
      tail -n 30 "${LOGS[$name]}" >&2 || true
      die "$name did not become ready within ${TIMEOUT}s; log: ${LOGS[$name]}"
    fi
    sleep 1
  done
}
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

ENV="$STATE/stack.env"
{
  echo "# written by e2e/stack/up.sh at $(date -Is)"
  echo "PARLEY_STACK_DIR=$STATE"
} >"$ENV.tmp"
envline() { echo "$1=$2" >>"$ENV.tmp"; }

# ---------------------------------------------------------------------------
# TLS: a throwaway CA per run ($STATE/tls/ca.crt, never reused), and server certificates it signs for
# localhost, 127.0.0.1 and 127.0.0.2 (PEM, unencrypted keys; PKCS#12 copies for the JVMs).
TLS="$STATE/tls"
tls_init() {
  rm -rf "$TLS"; mkdir -p "$TLS"; chmod 700 "$TLS"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=parley test CA $(date +%s%N)" \
    -keyout "$TLS/ca.key" -out "$TLS/ca.crt" >"$TLS/openssl.log" 2>&1 || die "openssl could not make the test CA (see $TLS/openssl.log)"
  envline PARLEY_TLS_CA_FILE "$TLS/ca.crt"
}
# issue_cert NAME -> $TLS/NAME.crt, $TLS/NAME.key, $TLS/NAME.p12 (password: parley-test)
issue_cert() {
  local n=$1
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$n" -keyout "$TLS/$n.key" -out "$TLS/$n.csr" >>"$TLS/openssl.log" 2>&1 \
    && openssl x509 -req -in "$TLS/$n.csr" -CA "$TLS/ca.crt" -CAkey "$TLS/ca.key" -CAcreateserial -days 2 \
      -out "$TLS/$n.crt" -extfile <(printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:127.0.0.2\nextendedKeyUsage=serverAuth,clientAuth\n') \
      >>"$TLS/openssl.log" 2>&1 \
    && openssl pkcs12 -export -in "$TLS/$n.crt" -inkey "$TLS/$n.key" -certfile "$TLS/ca.crt" -name "$n" \
      -passout pass:parley-test -out "$TLS/$n.p12" >>"$TLS/openssl.log" 2>&1 \
    || die "openssl could not issue the certificate of $n (see $TLS/openssl.log)"
  chmod 644 "$TLS/$n.key"
}
tls_init

# ---------------------------------------------------------------------------
# Redis: TLS only (`port 0`, a TLS port; the certificate from issue_cert redis; clients are not asked for one), the
# `default` user off and one ACL user with a password made per run. Each server reads its settings from a
# redis.conf in its dir (the chaos command starts Redis again from it: Redis rewrites its /proc command line).
REDIS_USER=parley
REDIS_PASSWORD=""
# redis_common DIR: the settings every Redis of the stack shares (TLS, users, no persistence).
redis_common() {
  cat <<EOF
bind 127.0.0.1
port 0
tls-cert-file $TLS/redis.crt
tls-key-file $TLS/redis.key
tls-ca-cert-file $TLS/ca.crt
tls-auth-clients no
user default off
user $REDIS_USER on >$REDIS_PASSWORD ~* &* +@all
save ""
appendonly no
dir $1
daemonize no
protected-mode yes
EOF
}
# redis_init: the certificate, the password and their stack.env lines, once for every Redis of the stack.
redis_init() {
  [[ -z "$REDIS_PASSWORD" ]] || return 0
  issue_cert redis
  REDIS_PASSWORD="parley-$(openssl rand -hex 16)" || die "openssl could not make the Redis password"
  envline PARLEY_REDIS_USERNAME "$REDIS_USER"
  envline PARLEY_REDIS_PASSWORD "$REDIS_PASSWORD"
  envline PARLEY_REDIS_TLS_CA_FILE "$TLS/ca.crt"
}
# rcli PORT ARGS...: redis-cli over TLS as the stack's user (the password through REDISCLI_AUTH, not argv).
rcli() {
  local port=$1; shift
  REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli --tls --cacert "$TLS/ca.crt" --user "$REDIS_USER" -h 127.0.0.1 -p "$port" "$@"
}
# write_redis_cli PORT: bin/redis-cli, the same for a person (default port: the standalone Redis, else the first
# cluster node).
write_redis_cli() {
  {
    echo '#!/usr/bin/env bash'
    echo "# redis-cli over TLS as the stack's ACL user: redis-cli [-p PORT] ARGS... (default port $1)"
    printf 'export REDISCLI_AUTH=%q\n' "$REDIS_PASSWORD"
    printf 'exec redis-cli --tls --cacert %q --user %q -h 127.0.0.1 -p %q "$@"\n' "$TLS/ca.crt" "$REDIS_USER" "$1"
  } >"$STATE/bin/redis-cli"
  chmod 700 "$STATE/bin/redis-cli"
}
start_redis() {
  local d="$STATE/redis"; mkdir -p "$d"
  redis_init
  REDIS_PORT=$(free_port)
  { redis_common "$d"; echo "tls-port $REDIS_PORT"; } >"$d/redis.conf"
  chmod 600 "$d/redis.conf"
  start redis "$d/redis.log" redis-server "$d/redis.conf"
  envline PARLEY_REDIS_URL "rediss://127.0.0.1:$REDIS_PORT"
  write_redis_cli "$REDIS_PORT"
}
redis_ready() { [[ "$(rcli "$REDIS_PORT" ping)" == PONG ]]; }
# The second region's Redis (--region2): independent of the first, the same certificate, CA, user and password.
start_redis_b() {
  local d="$STATE/redis_b"; mkdir -p "$d"
  redis_init
  REDIS_B_PORT=$(free_port)
  { redis_common "$d"; echo "tls-port $REDIS_B_PORT"; } >"$d/redis.conf"
  chmod 600 "$d/redis.conf"
  start redis_b "$d/redis.log" redis-server "$d/redis.conf"
  envline PARLEY_REDIS_B_URL "rediss://127.0.0.1:$REDIS_B_PORT"
}
redis_b_ready() { [[ "$(rcli "$REDIS_B_PORT" ping)" == PONG ]]; }

# Redis Cluster: three masters, no replicas, slots spread by redis-cli --cluster create; TLS on the cluster bus too.
start_redis_cluster() {
  local n d bus
  redis_init
  CLUSTER_PORTS=()
  for n in 1 2 3; do
    d="$STATE/redis-cluster/node$n"; mkdir -p "$d"
    CLUSTER_PORTS+=("$(free_port)")
    # The cluster bus port defaults to port + 10000, which may be taken (or in the ephemeral range): pick it too.
    bus=$(free_port)
    {
      redis_common "$d"
      echo "tls-port ${CLUSTER_PORTS[$((n - 1))]}"
      echo "tls-cluster yes"
      echo "tls-replication yes"
      echo "cluster-enabled yes"
      echo "cluster-port $bus"
      echo "cluster-config-file $d/nodes.conf"
      echo "cluster-node-timeout 5000"
    } >"$d/redis.conf"
    chmod 600 "$d/redis.conf"
    start "redis_cluster$n" "$d/redis.log" redis-server "$d/redis.conf"
  done
  want redis || write_redis_cli "${CLUSTER_PORTS[0]}"
}
redis_cluster_node_ready() { [[ "$(rcli "$1" ping)" == PONG ]]; }
redis_cluster_ok() {
  local port
  for port in "${CLUSTER_PORTS[@]}"; do
    rcli "$port" cluster info | grep -q '^cluster_state:ok' || return 1
  done
}
form_redis_cluster() {
  local nodes=() port urls=""
  for port in "${CLUSTER_PORTS[@]}"; do nodes+=("127.0.0.1:$port"); urls+="rediss://127.0.0.1:$port,"; done
  rcli "${CLUSTER_PORTS[0]}" --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes \
    >"$STATE/redis-cluster/create.log" 2>&1 \
    || { cat "$STATE/redis-cluster/create.log" >&2; die "redis-cli --cluster create failed"; }
  WAIT_LABEL=redis-cluster-ok wait_ready redis_cluster1 redis_cluster_ok
  envline PARLEY_REDIS_CLUSTER_URLS "${urls%,}"
}

# ---------------------------------------------------------------------------
# Passwords of the stack's Kafka and Cassandra users: made once per state dir and kept in $STATE/secrets, since
# the engines keep their users in their data, which outlives a restart of the stack.
SECRETS="$STATE/secrets"
engine_password() { # NAME
  local f="$SECRETS/$1"
  if [[ ! -s "$f" ]]; then
    mkdir -p "$SECRETS" && chmod 700 "$SECRETS" && openssl rand -hex 16 >"$f" || return 1
  fi
  cat "$f"
}

# ---------------------------------------------------------------------------
# Kafka (KRaft, combined broker+controller). Clients and the broker itself (inter-broker) use one SASL_SSL
# listener: SCRAM-SHA-512, users parley (clients, tools, MirrorMaker) and admin (inter-broker), both made at
# storage format time; the certificate comes from issue_cert kafka. The controller listener stays PLAINTEXT on
# loopback. No authorizer: an authenticated user may do anything.
KAFKA_JAVA="${KAFKA_JAVA:-java}"
KAFKA_CLIENT_PROPERTIES="$STATE/kafka-client.properties"
if want kafka; then
  if [[ ! -s "$SECRETS/kafka-parley" ]] && compgen -G "$STATE/kafka*/data/meta.properties" >/dev/null; then
    die "kafka: $STATE holds Kafka data formatted without SASL users; remove it first (e2e/stack/down.sh --purge $STATE)"
  fi
  KAFKA_PASSWORD=$(engine_password kafka-parley) && KAFKA_ADMIN_PASSWORD=$(engine_password kafka-admin) \
    || die "kafka: could not make the SASL passwords in $SECRETS"
  issue_cert kafka
  # For the Java clients (the tools' --command-config, MirrorMaker); librdkafka gets the same from stack.env.
  cat >"$KAFKA_CLIENT_PROPERTIES" <<EOF
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="parley" password="$KAFKA_PASSWORD";
ssl.truststore.type=PEM
ssl.truststore.location=$TLS/ca.crt
EOF
  chmod 600 "$KAFKA_CLIENT_PROPERTIES"
fi
cat >"$STATE/bin/kafka-log4j2.properties" <<'EOF'
status = warn
appender.err.type = Console
appender.err.name = STDERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.err.ref = STDERR
EOF
cat >"$STATE/bin/kafka-run" <<EOF
#!/usr/bin/env bash
# Runs a Kafka class with the stack's Kafka jars; the brokers want SASL_SSL, so give the tool the client
# properties (--command-config, --producer.config, --consumer.config ...), e.g.
#   kafka-run org.apache.kafka.tools.TopicCommand --bootstrap-server \$PARLEY_KAFKA_BOOTSTRAP \\
#     --command-config \$PARLEY_KAFKA_CLIENT_PROPERTIES --list
cls=\$1; shift
exec "$KAFKA_JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \\
  -Dlog4j2.configurationFile="$STATE/bin/kafka-log4j2.properties" \\
  -cp "$KAFKA_LIB/*" "\$cls" "\$@"
EOF
chmod +x "$STATE/bin/kafka-run"

# With --kafka-wan a second SASL_SSL listener WAN on its own port, advertised at a Toxiproxy port that
# make_kafka_wan_proxy later forwards to it: a client bootstrapping at the proxy gets the proxy back in metadata.
start_kafka() { # NAME -> sets KAFKA_PORT_<NAME> (and with --kafka-wan KAFKA_WAN_PORT_<NAME>, KAFKA_PROXY_PORT_<NAME>)
  local name=$1 d="$STATE/$1"; mkdir -p "$d/data"
  local bp cp wp="" tp=""
  bp=$(free_port); cp=$(free_port)
  local listeners="SASL_SSL://127.0.0.1:$bp,CONTROLLER://127.0.0.1:$cp" advertised="SASL_SSL://127.0.0.1:$bp"
  local protocols="CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL"
  if ((KAFKA_WAN)); then
    wp=$(free_port); tp=$(free_port)
    listeners+=",WAN://127.0.0.1:$wp"; advertised+=",WAN://127.0.0.1:$tp"; protocols+=",WAN:SASL_SSL"
  fi
  cat >"$d/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cp
listeners=$listeners
advertised.listeners=$advertised
controller.listener.names=CONTROLLER
inter.broker.listener.name=SASL_SSL
listener.security.protocol.map=$protocols
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$KAFKA_ADMIN_PASSWORD";
listener.name.wan.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PKCS12
ssl.keystore.location=$TLS/kafka.p12
ssl.keystore.password=parley-test
ssl.key.password=parley-test
ssl.truststore.type=PEM
ssl.truststore.location=$TLS/ca.crt
ssl.client.auth=none
log.dirs=$d/data
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=24
log.segment.bytes=67108864
EOF
  chmod 600 "$d/server.properties"
  cat >"$d/log4j2.properties" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = info
logger.state.name = state.change.logger
logger.state.level = warn
logger.request.name = kafka.request.logger
logger.request.level = warn
EOF
  local jvm=("$KAFKA_JAVA" -Xms256m "-Xmx${STACK_KAFKA_HEAP:-512m}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20
    -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true -Djava.net.preferIPv4Stack=true
    "-Dlog4j2.configurationFile=$d/log4j2.properties" "-Dkafka.logs.dir=$d" -cp "$KAFKA_LIB/*")
  if [[ ! -e "$d/data/meta.properties" ]]; then
    local cid
    # same format as kafka.tools.StorageTool random-uuid (base64url of 16 random bytes,
    # not starting with '-'), without paying for a JVM start
    cid=$(python3 -c 'import base64,os
while True:
    u=base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
    if not u.startswith("-"): print(u); break')
    [[ -n "$cid" ]] || die "kafka ($name): StorageTool random-uuid printed nothing"
    # The SCRAM users go into the bootstrap metadata, so the broker knows them (admin: inter-broker) from its start.
    nice -n "$NICE" "${jvm[@]}" -XX:TieredStopAtLevel=1 kafka.tools.StorageTool format -t "$cid" -c "$d/server.properties" -g \
      --add-scram "SCRAM-SHA-512=[name=admin,password=$KAFKA_ADMIN_PASSWORD]" \
      --add-scram "SCRAM-SHA-512=[name=parley,password=$KAFKA_PASSWORD]" \
      >"$d/format.log" 2>&1 || { cat "$d/format.log" >&2; die "kafka ($name): storage format failed; log: $d/format.log"; }
  fi
  start "$name" "$d/kafka.log" "${jvm[@]}" kafka.Kafka "$d/server.properties"
  printf -v "KAFKA_PORT_${name//-/_}" '%s' "$bp"
  printf -v "KAFKA_WAN_PORT_${name//-/_}" '%s' "$wp"
  printf -v "KAFKA_PROXY_PORT_${name//-/_}" '%s' "$tp"
}
kafka_ready() { # PORT: answers over TLS and takes user parley's password
  port_open 127.0.0.1 "$1" || return 1
  "$STATE/bin/kafka-run" org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$1" \
    --command-config "$KAFKA_CLIENT_PROPERTIES" \
    --create --if-not-exists --topic parley-stack-ready --partitions 1 --replication-factor 1 >/dev/null 2>&1 || return 1
  "$STATE/bin/kafka-run" org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$1" \
    --command-config "$KAFKA_CLIENT_PROPERTIES" --list 2>/dev/null | grep -qx parley-stack-ready
}

# bin/mm2-run: MirrorMaker 2 in dedicated mode, in the foreground, from any mm2.properties (what up.sh --mm2 starts,
# and what a test or the pod runner starts for an apache/kafka pod running connect-mirror-maker.sh). Like Kafka's
# scripts it reads KAFKA_HEAP_OPTS and KAFKA_OPTS; it logs INFO to stdout with the stack's log4j2 configuration.
MM2_LOG4J="$STATE/bin/mm2-log4j2.properties"
write_mm2_run() {
  local java; java=$(command -v "$KAFKA_JAVA") || die "mm2: $KAFKA_JAVA not found (set KAFKA_JAVA)"
  cat >"$MM2_LOG4J" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = STDOUT
logger.reflections.name = org.reflections
logger.reflections.level = error
EOF
  cat >"$STATE/bin/mm2-run" <<EOF
#!/usr/bin/env bash
# MirrorMaker 2 (org.apache.kafka.connect.mirror.MirrorMaker, dedicated mode) in the foreground, as Apache Kafka's
# connect-mirror-maker.sh runs it:  mm2-run MM2_PROPERTIES [--clusters ALIAS...]
# Jars: $MM2_LIB (connect-mirror $(cat "$CACHE/kafka/mm2/version" 2>/dev/null)).
# KAFKA_HEAP_OPTS (default -Xms128m -Xmx512m) and KAFKA_OPTS are read as Kafka's scripts read them.
if [[ \$# -lt 1 || "\$1" == -* ]]; then
  echo "usage: mm2-run MM2_PROPERTIES [--clusters ALIAS...]" >&2; exit 2
fi
[[ -r "\$1" ]] || { echo "mm2-run: cannot read the MirrorMaker 2 properties \$1" >&2; exit 2; }
exec "$java" \${KAFKA_HEAP_OPTS:--Xms128m -Xmx512m} -XX:+UseG1GC -XX:-UsePerfData -Djava.awt.headless=true \\
  -Djava.net.preferIPv4Stack=true -Dlog4j2.configurationFile="$MM2_LOG4J" \${KAFKA_OPTS:-} \\
  -cp "$MM2_LIB/*" org.apache.kafka.connect.mirror.MirrorMaker "\$@"
EOF
  chmod 755 "$STATE/bin/mm2-run"
}

start_mm2() {
  local d="$STATE/mm2"; mkdir -p "$d"
  cat >"$d/mm2.properties" <<EOF
clusters=A,B
A.bootstrap.servers=127.0.0.1:$KAFKA_PORT_kafka
B.bootstrap.servers=127.0.0.1:$KAFKA_PORT_kafka_b
EOF
  # Every client of each cluster (consumers, producers, admin, the Connect worker on B) as user parley over TLS.
  local cluster
  for cluster in A B; do sed "s/^/$cluster./" "$KAFKA_CLIENT_PROPERTIES" >>"$d/mm2.properties"; done
  cat >>"$d/mm2.properties" <<EOF
A->B.enabled=true
A->B.topics=.*
B->A.enabled=false
replication.factor=1
checkpoints.topic.replication.factor=1
heartbeats.topic.replication.factor=1
offset-syncs.topic.replication.factor=1
offset.storage.replication.factor=1
status.storage.replication.factor=1
config.storage.replication.factor=1
refresh.topics.interval.seconds=5
refresh.groups.interval.seconds=5
sync.topic.configs.enabled=false
sync.topic.acls.enabled=false
emit.checkpoints.interval.seconds=5
tasks.max=1
EOF
  chmod 600 "$d/mm2.properties"
  start mm2 "$d/mm2.log" "$STATE/bin/mm2-run" "$d/mm2.properties" --clusters B
  envline PARLEY_MM2_SOURCE_ALIAS A
}
mm2_ready() { grep -q "MirrorSourceConnector" "$STATE/mm2/mm2.log" && grep -qiE "Kafka MirrorMaker started|MirrorMaker started" "$STATE/mm2/mm2.log"; }

# ---------------------------------------------------------------------------
# Cassandra 5.0 (JDK 17)
find_java17() {
  local j
  if [[ -n "${CASSANDRA_JAVA:-}" ]]; then
    "$CASSANDRA_JAVA" -version 2>&1 | head -n1 | grep -qE 'version "17[."]' && { echo "$CASSANDRA_JAVA"; return 0; }
    echo "CASSANDRA_JAVA=$CASSANDRA_JAVA is not a JDK 17" >&2; return 1
  fi
  for j in "${JAVA17_HOME:+$JAVA17_HOME/bin/java}" java /usr/lib/jvm/*17*/bin/java /opt/*17*/bin/java; do
    [[ -n "$j" ]] && command -v "$j" >/dev/null 2>&1 || continue
    if "$j" -version 2>&1 | head -n1 | grep -qE 'version "17[."]'; then command -v "$j"; return 0; fi
  done
  return 1
}

# The JPMS flags of Cassandra 5.0's conf/jvm17-server.options (not shipped in the jar).
CASS_JPMS=(
  -Djdk.attach.allowAttachSelf=true
  --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
  --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
  --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
  --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
  --add-exports java.sql/java.sql=ALL-UNNAMED
  --add-exports java.base/java.lang.ref=ALL-UNNAMED
  --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
  --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
  --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
  --add-opens java.base/java.lang.module=ALL-UNNAMED
  --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
  --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
  --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
  --add-opens java.base/jdk.internal.math=ALL-UNNAMED
  --add-opens java.base/jdk.internal.module=ALL-UNNAMED
  --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
  --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
  --add-opens java.base/sun.nio.ch=ALL-UNNAMED
  --add-opens java.base/java.io=ALL-UNNAMED
  --add-opens java.base/java.lang.reflect=ALL-UNNAMED
  --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
  --add-opens java.base/java.lang=ALL-UNNAMED
  --add-opens java.base/java.util=ALL-UNNAMED
  -Dio.netty.tryReflectionSetAccessible=true
  -Dio.netty.allocator.useCacheForAllThreads=true
  -Dio.netty.allocator.maxOrder=11
)

CQL_PY="$STATE/bin/cql.py"
cat >"$CQL_PY" <<'EOF'
"""Tiny cqlsh stand-in: cql.py [-h HOST] [-p PORT] [--dc DC] [--ca PEM] [-u USER (--password P | --password-file F)]
STATEMENT...; prints rows. With --ca: TLS, the node's certificate checked against that CA and the node's address."""
import argparse, ssl, sys, warnings
warnings.filterwarnings("ignore")
import logging; logging.basicConfig(level=logging.CRITICAL)
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import Cluster, ExecutionProfile, EXEC_PROFILE_DEFAULT
from cassandra.policies import DCAwareRoundRobinPolicy, WhiteListRoundRobinPolicy
ap = argparse.ArgumentParser(add_help=False)
ap.add_argument("-h", "--host", default="127.0.0.1")
ap.add_argument("-p", "--port", type=int, default=9042)
ap.add_argument("--dc")
ap.add_argument("--only-host", action="store_true", help="talk to --host alone")
ap.add_argument("--timeout", type=float, default=30)
ap.add_argument("--ca", help="PEM file of the CA to trust: connect with TLS")
ap.add_argument("-u", "--user")
ap.add_argument("--password")
ap.add_argument("--password-file")
ap.add_argument("stmts", nargs="+")
a = ap.parse_args()
security = {}
if a.ca:
    security["ssl_context"] = ssl.create_default_context(cafile=a.ca)
if a.user:
    password = a.password
    if password is None:
        with open(a.password_file) as f:
            password = f.read().strip()
    security["auth_provider"] = PlainTextAuthProvider(username=a.user, password=password)
if a.only_host:
    lb = WhiteListRoundRobinPolicy([a.host])
else:
    lb = DCAwareRoundRobinPolicy(local_dc=a.dc) if a.dc else DCAwareRoundRobinPolicy()
prof = ExecutionProfile(load_balancing_policy=lb, request_timeout=a.timeout)
c = Cluster([a.host], port=a.port, execution_profiles={EXEC_PROFILE_DEFAULT: prof},
            protocol_version=5, connect_timeout=5, control_connection_timeout=5, **security)
try:
    s = c.connect()
    for st in a.stmts:
        for row in s.execute(st):
            print("|".join("" if v is None else str(v) for v in row))
finally:
    c.shutdown()
EOF
# As role parley over TLS; later options win (e.g. --user cassandra --password cassandra, the default superuser).
cat >"$STATE/bin/cql" <<EOF
#!/usr/bin/env bash
exec "$PY" "$CQL_PY" --ca "$TLS/ca.crt" --user parley --password-file "$SECRETS/cassandra-parley" "\$@"
EOF
chmod +x "$STATE/bin/cql"
if want cassandra; then
  CASS_PASSWORD=$(engine_password cassandra-parley) || die "cassandra: could not make the password in $SECRETS"
  issue_cert cassandra
fi

cat >"$STATE/bin/tools-logback.xml" <<'EOF'
<configuration>
  <appender name="ERR" class="ch.qos.logback.core.ConsoleAppender">
    <target>System.err</target>
    <encoder><pattern>%-5level %msg%n</pattern></encoder>
  </appender>
  <root level="WARN"><appender-ref ref="ERR"/></root>
</configuration>
EOF
CASS_JAVA_BIN=""
want cassandra && { CASS_JAVA_BIN=$(find_java17) || die "cassandra: no JDK 17 found (set CASSANDRA_JAVA); Cassandra 5.0 runs on JDK 17 only"; }
{
  echo '#!/usr/bin/env bash'
  echo '# nodetool over local JMX: nodetool [-p JMX_PORT] ARGS (default port: node 1 from stack.env)'
  echo 'port=$(sed -n "s/^PARLEY_CASSANDRA_JMX_PORT=//p" "$(dirname "$0")/../stack.env" 2>/dev/null)'
  echo 'if [[ "${1:-}" == -p ]]; then port=$2; shift 2; fi'
  printf 'exec %q -Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1' "$CASS_JAVA_BIN"
  printf ' %q' "${CASS_JPMS[@]}" "-Dlogback.configurationFile=$STATE/bin/tools-logback.xml" "-Dcassandra.logdir=$STATE/bin" \
    -cp "$CASS_LIB/*" org.apache.cassandra.tools.NodeTool -h 127.0.0.1
  echo ' -p "$port" "$@"'
} >"$STATE/bin/nodetool"
chmod +x "$STATE/bin/nodetool"

CASS_STORAGE_PORT=""; CASS_NATIVE_PORT=""
start_cassandra() { # NAME IP DC
  local name=$1 ip=$2 dc=$3 d="$STATE/$1"
  local java=$CASS_JAVA_BIN
  if [[ -z "$CASS_STORAGE_PORT" ]]; then
    # cluster-wide ports: the same on every node, so they must be free on both addresses
    local extra=(); ((DC2)) && extra=(127.0.0.2)
    CASS_STORAGE_PORT=$(free_port "${extra[@]}")
    CASS_NATIVE_PORT=$(free_port "${extra[@]}")
  fi
  local jmx; jmx=$(free_port)
  mkdir -p "$d/conf" "$d/storage" "$d/logs" "$d/triggers"
  # a node whose dc changed must start from empty data dirs
  if [[ -f "$d/storage/.dc" && "$(cat "$d/storage/.dc")" != "$dc" ]]; then rm -rf "$d/storage"; mkdir -p "$d/storage"; fi
  echo "$dc" >"$d/storage/.dc"
  cat >"$d/conf/cassandra.yaml" <<EOF
cluster_name: parley-e2e
num_tokens: 16
allocate_tokens_for_local_replication_factor: 1
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: GossipingPropertyFileSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:$CASS_STORAGE_PORT"
listen_address: $ip
rpc_address: $ip
storage_port: $CASS_STORAGE_PORT
native_transport_port: $CASS_NATIVE_PORT
start_native_transport: true
auto_bootstrap: false
data_file_directories:
  - $d/storage/data
commitlog_directory: $d/storage/commitlog
saved_caches_directory: $d/storage/saved_caches
hints_directory: $d/storage/hints
cdc_raw_directory: $d/storage/cdc_raw
commitlog_sync: periodic
commitlog_sync_period: 10000ms
commitlog_segment_size: 8MiB
commitlog_total_space: 256MiB
authenticator: PasswordAuthenticator
authorizer: AllowAllAuthorizer
role_manager: CassandraRoleManager
network_authorizer: AllowAllNetworkAuthorizer
# Roles live in system_auth, kept in dc1 (see setup_cassandra_roles): a dc2 node reads them from dc1.
auth_read_consistency_level: ONE
client_encryption_options:
  enabled: true
  optional: false
  keystore: $TLS/cassandra.p12
  keystore_password: parley-test
  store_type: PKCS12
  require_client_auth: false
concurrent_reads: 8
concurrent_writes: 8
concurrent_counter_writes: 4
concurrent_materialized_view_writes: 4
concurrent_compactors: 1
memtable_heap_space: 128MiB
key_cache_size: 16MiB
file_cache_size: 64MiB
networking_cache_size: 32MiB
native_transport_max_threads: 32
auto_snapshot: false
snapshot_before_compaction: false
incremental_backups: false
read_request_timeout: 10000ms
range_request_timeout: 20000ms
write_request_timeout: 5000ms
counter_write_request_timeout: 10000ms
truncate_request_timeout: 60000ms
request_timeout: 20000ms
gc_warn_threshold: 1000ms
materialized_views_enabled: true
EOF
  printf 'dc=%s\nrack=rack1\n' "$dc" >"$d/conf/cassandra-rackdc.properties"
  cat >"$d/conf/logback.xml" <<EOF
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>$d/logs/system.log</file>
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <filter class="ch.qos.logback.classic.filter.ThresholdFilter"><level>INFO</level></filter>
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <logger name="org.apache.cassandra" level="INFO"/>
  <logger name="com.datastax" level="WARN"/>
  <root level="INFO"><appender-ref ref="FILE"/><appender-ref ref="STDOUT"/></root>
</configuration>
EOF
  local jamm; jamm=$(ls "$CASS_LIB"/jamm-*.jar | head -n1)
  local opts=(-Xms"${STACK_CASSANDRA_HEAP:-1G}" -Xmx"${STACK_CASSANDRA_HEAP:-1G}" -Xss256k
    -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1 -XX:G1HeapRegionSize=16m
    -XX:G1RSetUpdatingPauseTimePercent=5 -XX:MaxGCPauseMillis=300 -XX:InitiatingHeapOccupancyPercent=70
    -XX:MaxDirectMemorySize=512m -XX:+ExitOnOutOfMemoryError
    "-javaagent:$jamm" "${CASS_JPMS[@]}"
    -Djava.net.preferIPv4Stack=true -Dcassandra-foreground=yes
    "-Dcassandra.storagedir=$d/storage" "-Dcassandra.logdir=$d/logs"
    "-Dlogback.configurationFile=$d/conf/logback.xml"
    "-Dcassandra.jmx.local.port=$jmx" "-Dcassandra.triggers_dir=$d/triggers"
    -Dcassandra.skip_wait_for_gossip_to_settle=0
    -Dcassandra.ring_delay_ms=5000
    -Dcassandra.superuser_setup_delay_ms=0
    -Dcassandra.max_local_pause_in_ms=5000
    -cp "$d/conf:$CASS_LIB/*" org.apache.cassandra.service.CassandraDaemon)
  start "$name" "$d/logs/stdout.log" "$java" "${opts[@]}"
  printf -v "CASS_JMX_${name}" '%s' "$jmx"
}
cassandra_ready() { # IP [cql options, e.g. the user]: answers over TLS, as role parley unless told otherwise
  local ip=$1; shift
  port_open "$ip" "$CASS_NATIVE_PORT" || return 1
  "$STATE/bin/cql" -h "$ip" -p "$CASS_NATIVE_PORT" --only-host --timeout 10 "$@" \
    "SELECT release_version FROM system.local" | grep -q '^5\.'
}
# As the default superuser (cassandra/cassandra, which the test stack keeps): system_auth gets
# NetworkTopologyStrategy in dc1 only (a dc2 node joins without streaming, so a replica of the roles there would
# come up empty; it reads them from dc1 at ONE), and role parley gets its password (again on a restart).
setup_cassandra_roles() {
  local superuser=("$STATE/bin/cql" -h 127.0.0.1 -p "$CASS_NATIVE_PORT" --only-host --user cassandra --password cassandra)
  local role="CREATE ROLE parley WITH PASSWORD = '$CASS_PASSWORD' AND LOGIN = true" log="$STATE/cassandra1/roles.log"
  # (a password may change once per 5 s: ALTER only a role that exists)
  if "${superuser[@]}" "SELECT role FROM system_auth.roles WHERE role = 'parley'" 2>"$log" | grep -qx parley; then
    role="ALTER ROLE parley WITH PASSWORD = '$CASS_PASSWORD' AND LOGIN = true"
  fi
  "${superuser[@]}" "ALTER KEYSPACE system_auth WITH replication = {'class': 'NetworkTopologyStrategy', 'dc1': 1}" \
    "$role" >>"$log" 2>&1 || { cat "$log" >&2; die "cassandra: could not create role parley; log: $log"; }
}
dc2_joined() { # node 1 sees 127.0.0.2 in dc2
  "$STATE/bin/cql" -h 127.0.0.1 -p "$CASS_NATIVE_PORT" --only-host \
    "SELECT peer, data_center FROM system.peers_v2" | grep -q '^127.0.0.2|dc2$'
}

# ---------------------------------------------------------------------------
# Toxiproxy (--toxiproxy): the server's API on a free loopback port. Tests make their proxies through the API
# (POST /proxies with "listen": "127.0.0.1:0" picks a free port); proxies live as long as the server.
TOXIPROXY_BIN="${PARLEY_CACHE:-$HOME/.cache/parley}/toxiproxy/${TOXIPROXY_VERSION:-v2.5.0}/bin"
start_toxiproxy() {
  local d="$STATE/toxiproxy"; mkdir -p "$d"
  TOXIPROXY_PORT=$(free_port)
  start toxiproxy "$d/toxiproxy.log" "$TOXIPROXY_BIN/toxiproxy-server" -host 127.0.0.1 -port "$TOXIPROXY_PORT"
  cat >"$STATE/bin/toxiproxy-cli" <<EOF
#!/usr/bin/env bash
# Toxiproxy's CLI against the stack's server, e.g. toxiproxy-cli list
exec "$TOXIPROXY_BIN/toxiproxy-cli" --host "http://127.0.0.1:$TOXIPROXY_PORT" "\$@"
EOF
  chmod +x "$STATE/bin/toxiproxy-cli"
  envline PARLEY_TOXIPROXY_URL "http://127.0.0.1:$TOXIPROXY_PORT"
}
# make_kafka_wan_proxy NAME PROXY VARIABLE: the Toxiproxy proxy PROXY from Kafka NAME's advertised WAN port to its
# WAN listener (no toxics: a bench adds them), and VARIABLE=its bootstrap (and VARIABLE's _PROXY twin=PROXY).
make_kafka_wan_proxy() {
  local name=$1 proxy=$2 variable=$3 wan_var="KAFKA_WAN_PORT_$1" proxy_var="KAFKA_PROXY_PORT_$1"
  local listen="127.0.0.1:${!proxy_var}" upstream="127.0.0.1:${!wan_var}"
  python3 - "http://127.0.0.1:$TOXIPROXY_PORT/proxies" "$proxy" "$listen" "$upstream" <<'EOF' \
    || die "toxiproxy: could not make proxy $proxy ($listen -> $upstream)"
import json, sys, urllib.request
url, name, listen, upstream = sys.argv[1:]
body = json.dumps({"name": name, "listen": listen, "upstream": upstream, "enabled": True}).encode()
request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
urllib.request.urlopen(request, timeout=5).read()
EOF
  envline "$variable" "$listen"
  envline "${variable%_BOOTSTRAP}_PROXY" "$proxy"
}
toxiproxy_ready() {
  python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2).read()' \
    "http://127.0.0.1:$TOXIPROXY_PORT/version"
}

# ---------------------------------------------------------------------------
T0=$(now)
# Launch everything first (the JVMs start in parallel), then wait for each.
# Slowest first; Kafka's storage format runs in the foreground (a few seconds).
want cassandra && start_cassandra cassandra1 127.0.0.1 dc1
if want kafka; then start_kafka kafka; ((KAFKA2)) && start_kafka kafka_b; fi
want redis && start_redis
((REDIS2)) && start_redis_b
want redis-cluster && start_redis_cluster
((TOXIPROXY)) && start_toxiproxy

want redis && wait_ready redis redis_ready
((REDIS2)) && wait_ready redis_b redis_b_ready
((TOXIPROXY)) && wait_ready toxiproxy toxiproxy_ready
if want redis-cluster; then
  for n in 1 2 3; do wait_ready "redis_cluster$n" redis_cluster_node_ready "${CLUSTER_PORTS[$((n - 1))]}"; done
  form_redis_cluster
fi
if want kafka; then
  wait_ready kafka kafka_ready "$KAFKA_PORT_kafka"
  envline PARLEY_KAFKA_BOOTSTRAP "127.0.0.1:$KAFKA_PORT_kafka"
  if ((KAFKA2)); then
    wait_ready kafka_b kafka_ready "$KAFKA_PORT_kafka_b"
    envline PARLEY_KAFKA_B_BOOTSTRAP "127.0.0.1:$KAFKA_PORT_kafka_b"
  fi
  if ((KAFKA_WAN)); then
    # Checked through the proxy: bootstrap there, then the advertised WAN address (the proxy again).
    make_kafka_wan_proxy kafka kafka-wan PARLEY_KAFKA_WAN_BOOTSTRAP
    WAIT_LABEL=kafka-wan wait_ready kafka kafka_ready "$KAFKA_PROXY_PORT_kafka"
    if ((KAFKA2)); then
      make_kafka_wan_proxy kafka_b kafka-b-wan PARLEY_KAFKA_B_WAN_BOOTSTRAP
      WAIT_LABEL=kafka-b-wan wait_ready kafka_b kafka_ready "$KAFKA_PROXY_PORT_kafka_b"
    fi
  fi
  envline PARLEY_KAFKA_LIB "$KAFKA_LIB"
  envline PARLEY_KAFKA_RUN "$STATE/bin/kafka-run"
  envline PARLEY_KAFKA_CLIENT_PROPERTIES "$KAFKA_CLIENT_PROPERTIES"
  envline PARLEY_KAFKA_TLS_CA_FILE "$TLS/ca.crt"
  envline PARLEY_KAFKA_SASL_MECHANISM SCRAM-SHA-512
  envline PARLEY_KAFKA_SASL_USERNAME parley
  envline PARLEY_KAFKA_SASL_PASSWORD "$KAFKA_PASSWORD"
  if [[ -d "$MM2_LIB" ]]; then
    write_mm2_run
    envline PARLEY_MM2_RUN "$STATE/bin/mm2-run"
  fi
fi
if want cassandra; then
  WAIT_LABEL=cassandra1 wait_ready cassandra1 cassandra_ready 127.0.0.1 --user cassandra --password cassandra
  setup_cassandra_roles
  WAIT_LABEL=cassandra1-role-parley wait_ready cassandra1 cassandra_ready 127.0.0.1
  envline PARLEY_CASSANDRA_CONTACT "127.0.0.1:$CASS_NATIVE_PORT"
  envline PARLEY_CASSANDRA_TLS_CA_FILE "$TLS/ca.crt"
  envline PARLEY_CASSANDRA_USERNAME parley
  envline PARLEY_CASSANDRA_PASSWORD "$CASS_PASSWORD"
  envline PARLEY_CASSANDRA_DC dc1
  # The routers and tests started with this environment keep their keyspaces in dc1 (a cluster with dc2 too would
  # otherwise place SimpleStrategy replicas on dc2's node, out of reach of LOCAL_QUORUM in dc1).
  envline PARLEY_CASSANDRA_LOCAL_DATACENTER dc1
  envline PARLEY_CASSANDRA_JMX_PORT "$CASS_JMX_cassandra1"
  envline PARLEY_CQL "$STATE/bin/cql"
  if ((DC2)); then
    start_cassandra cassandra2 127.0.0.2 dc2
    wait_ready cassandra2 cassandra_ready 127.0.0.2
    WAIT_LABEL=cassandra2-joined-dc2 wait_ready cassandra2 dc2_joined
    envline PARLEY_CASSANDRA_CONTACT_DC2 "127.0.0.2:$CASS_NATIVE_PORT"
    envline PARLEY_CASSANDRA_JMX_PORT_DC2 "$CASS_JMX_cassandra2"
  fi
fi
if ((MM2)); then
  [[ -x "$STATE/bin/mm2-run" ]] \
    || die "mm2: the connect-mirror jars are not installed ($MM2_LIB; STACK_ONLY=kafka,mm2 e2e/stack/install.sh)"
  start_mm2
  wait_ready mm2 mm2_ready
fi

mv "$ENV.tmp" "$ENV"
{
  for n in "${!READY_S[@]}"; do echo "$n ${READY_S[$n]}"; done
} | sort >"$STATE/ready-times.txt"
log "stack up in $(since "$T0")s; env: $ENV"
cat "$ENV"
