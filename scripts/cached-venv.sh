# Sourced by the *-env.sh scripts: build_cached_venv DIR INSTALL builds a virtual environment once.
# INSTALL is a function given the new environment's directory. The environment is built in a
# temporary directory and renamed into place once INSTALL succeeded, so an interrupted build is
# never used. Moving a venv keeps bin/python working (its prefix follows the executable); only
# console scripts' shebangs name the build directory, and nothing here runs them.
build_cached_venv() {
    local env_dir="$1" install="$2"
    if [ -x "$env_dir/bin/python" ] && [ -f "$env_dir/.ready" ]; then
        return 0
    fi
    local tmp="$env_dir.building.$$"
    rm -rf "$tmp"
    mkdir -p "$(dirname "$env_dir")"
    python3 -m venv "$tmp"
    "$install" "$tmp"
    touch "$tmp/.ready"
    rm -rf "$env_dir"
    mv "$tmp" "$env_dir"
}
