// Where the GoogleTests find the Python-written fixtures of the source tree.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace natgrad_test {

// A file of the source tree, e.g. source_path("tests/fixtures/kfac_parity.pt"). The root comes
// from $NATGRAD_SOURCE_ROOT, which ctest sets on every test (CMakeLists.txt): no path is compiled
// into a test object, so ccache shares them between clones.
inline std::string source_path(const std::string& relative) {
  const char* root = std::getenv("NATGRAD_SOURCE_ROOT");
  TORCH_CHECK(root != nullptr && *root != '\0',
              "NATGRAD_SOURCE_ROOT is not set: run the tests through ctest (which sets it), or "
              "export NATGRAD_SOURCE_ROOT=<the natgrad checkout> to run natgrad_tests directly "
              "(needed for ",
              relative, ")");
  return std::string(root) + "/" + relative;
}

}  // namespace natgrad_test
