// natgrad._C: loading this module runs every TORCH_LIBRARY registration in csrc/ (the ops then
// live under torch.ops.natgrad). It also reports build facts and exposes the test-only fault
// injection of the fallback ladder. The only source compiled by setup.py alone.
#include <pybind11/pybind11.h>

#include <torch/version.h>

#include "linalg/ladder.h"
#include "version.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "natgrad's compiled core (operators are under torch.ops.natgrad)";
  m.attr("__version__") = NATGRAD_VERSION;
  m.def(
      "build_info",
      [] {
        py::dict info;
        info["version"] = NATGRAD_VERSION;
    // Hand-written CUDA kernels (csrc/**/*.cu) compiled in. There are none today: the ops
    // reach CUDA through ATen (see natgrad.build_info()["devices"]).
#ifdef NATGRAD_WITH_CUDA
        info["cuda_kernels"] = true;
#else
        info["cuda_kernels"] = false;
#endif
        info["torch_version"] = TORCH_VERSION;
        info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
        return info;
      },
      "Facts fixed when the extension was compiled: version, cuda_kernels, torch_version, "
      "cxx11_abi.");
  m.def("_force_ladder_failures", &natgrad::testing::force_ladder_failures, py::arg("count"),
        "Testing only: make the next `count` fallback-ladder attempts fail.");
  m.def("_pending_ladder_failures", &natgrad::testing::pending_ladder_failures,
        "Testing only: forced ladder failures not yet consumed.");
}
