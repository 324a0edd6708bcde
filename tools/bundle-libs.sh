# Sourced by tools/gpu-bundle.sh and tools/gpu-quick.sh (not run).
# mixserve_bundle_libs <bundle-dir>: copies into <bundle-dir>/lib the shared libraries that the
# binaries in <bundle-dir>/bin link and a GPU host image may lack: everything but glibc,
# libstdc++/libgcc, the driver, cuBLAS and NCCL (those come from the host; tools/gpu-env.sh puts
# the host's NCCL 2.28.9 first).
mixserve_bundle_libs() {
  local bundle="$1" bin lib
  mkdir -p "$bundle/lib"
  for bin in "$bundle"/bin/*; do
    ldd "$bin" | awk '/=> \//{print $3}'
  done | sort -u | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libdl.so*|librt.so*|libpthread.so*|libstdc++.so*|libgcc_s.so*|ld-linux*|libcuda.so*) ;;
      libcublas.so*|libcublasLt.so*|libnccl.so*) ;;
      *) cp -L "$lib" "$bundle/lib/" ;;
    esac
  done
}
