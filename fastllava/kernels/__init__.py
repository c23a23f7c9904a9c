"""fastllava's compiled CPU kernels (C++ built on first use with torch's cpp_extension, cached on disk)."""
