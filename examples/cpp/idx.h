// A reader for the IDX files of MNIST and Fashion-MNIST (plain or gzip-compressed), and the
// Fashion-MNIST loader of the example program.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>

namespace natgrad_examples {

// Parses one IDX file: two zero bytes, a type code (only 0x08, unsigned bytes, is supported),
// the number of dimensions n, n big-endian uint32 sizes, then the data in C order. A path
// ending in ".gz" is decompressed (zlib when CMake found it, else `gzip -dc`).
// Returns a uint8 tensor of the header's shape. Throws std::runtime_error naming the file when
// it cannot be read, the header is malformed or the payload size does not match it.
at::Tensor read_idx(const std::string& path);

// One split of Fashion-MNIST: images flattened to [N, 784] float32 in [0, 1], labels int64 [N].
struct Split {
  at::Tensor images;
  at::Tensor labels;
};

// The directory holding the four Fashion-MNIST IDX files: `dir` when given, else
// $NATGRAD_FASHION_MNIST_DIR, else Debian's /usr/share/datasets/fashion-mnist (package
// dataset-fashion-mnist). The same search as benchmarks/data.py.
std::string fashion_mnist_dir(const std::optional<std::string>& dir = std::nullopt);

// Whether `dir` holds the four files (plain or .gz).
bool fashion_mnist_present(const std::string& dir);

// Loads the "train" or "t10k" split from `dir`; with `size` set, the first `size` images.
Split load_fashion_mnist(const std::string& dir, const std::string& split,
                         std::optional<int64_t> size = std::nullopt);

}  // namespace natgrad_examples
