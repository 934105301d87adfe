#include "idx.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <vector>

#ifdef NATGRAD_HAVE_ZLIB
#include <zlib.h>
#endif

namespace natgrad_examples {
namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool file_exists(const std::string& path) { return std::ifstream(path, std::ios::binary).good(); }

std::vector<unsigned char> read_plain(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::vector<unsigned char> read_gzip(const std::string& path) {
  std::vector<unsigned char> out;
  unsigned char buf[1 << 16];
#ifdef NATGRAD_HAVE_ZLIB
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) throw std::runtime_error(path + ": cannot open");
  int got = 0;
  while ((got = gzread(f, buf, sizeof(buf))) > 0) out.insert(out.end(), buf, buf + got);
  const bool failed = got < 0;
  gzclose(f);
  if (failed) throw std::runtime_error(path + ": corrupt gzip data");
#else
  if (!file_exists(path)) throw std::runtime_error(path + ": cannot open");
  std::string quoted = "'";
  for (char c : path) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  FILE* pipe = popen(("gzip -dc " + quoted + "'").c_str(), "r");
  if (pipe == nullptr) throw std::runtime_error(path + ": cannot run gzip -dc");
  size_t got = 0;
  while ((got = fread(buf, 1, sizeof(buf), pipe)) > 0) out.insert(out.end(), buf, buf + got);
  if (pclose(pipe) != 0) throw std::runtime_error(path + ": gzip -dc failed (corrupt gzip data?)");
#endif
  return out;
}

std::string locate(const std::string& dir, const std::string& stem) {
  for (const std::string& name : {stem, stem + ".gz"}) {
    if (file_exists(dir + "/" + name)) return dir + "/" + name;
  }
  throw std::runtime_error("Fashion-MNIST file " + stem + "[.gz] not found in " + dir +
                           ". Install the Debian package with `apt-get install dataset-fashion-mnist` "
                           "(scripts/env.sh does this), or point NATGRAD_FASHION_MNIST_DIR at a "
                           "directory holding the four IDX files.");
}

}  // namespace

at::Tensor read_idx(const std::string& path) {
  const std::vector<unsigned char> raw = ends_with(path, ".gz") ? read_gzip(path) : read_plain(path);
  if (raw.size() < 4 || raw[0] != 0 || raw[1] != 0) {
    throw std::runtime_error(path + ": not an IDX file (bad magic bytes)");
  }
  if (raw[2] != 0x08) {
    throw std::runtime_error(path + ": IDX type code " + std::to_string(raw[2]) +
                             " is not supported (only 0x08, unsigned bytes)");
  }
  const size_t ndim = raw[3], header = 4 + 4 * ndim;
  if (ndim == 0 || raw.size() < header) throw std::runtime_error(path + ": truncated IDX header");
  std::vector<int64_t> shape;
  int64_t count = 1;
  for (size_t d = 0; d < ndim; ++d) {
    const unsigned char* p = raw.data() + 4 + 4 * d;
    shape.push_back((int64_t{p[0]} << 24) | (int64_t{p[1]} << 16) | (int64_t{p[2]} << 8) | int64_t{p[3]});
    count *= shape.back();
  }
  if (static_cast<int64_t>(raw.size() - header) != count) {
    throw std::runtime_error(path + ": header says " + std::to_string(count) + " bytes of data but the payload has " +
                             std::to_string(raw.size() - header));
  }
  at::Tensor out = at::empty(shape, at::kByte);
  std::copy(raw.begin() + header, raw.end(), out.mutable_data_ptr<uint8_t>());
  return out;
}

std::string fashion_mnist_dir(const std::optional<std::string>& dir) {
  if (dir) return *dir;
  if (const char* env = std::getenv("NATGRAD_FASHION_MNIST_DIR"); env != nullptr && *env) return env;
  return "/usr/share/datasets/fashion-mnist";
}

bool fashion_mnist_present(const std::string& dir) {
  for (const std::string stem : {"train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}) {
    if (!file_exists(dir + "/" + stem) && !file_exists(dir + "/" + stem + ".gz")) return false;
  }
  return true;
}

Split load_fashion_mnist(const std::string& dir, const std::string& split, std::optional<int64_t> size) {
  at::Tensor images = read_idx(locate(dir, split + "-images-idx3-ubyte"));
  at::Tensor labels = read_idx(locate(dir, split + "-labels-idx1-ubyte"));
  if (images.size(0) != labels.size(0)) {
    throw std::runtime_error("Fashion-MNIST " + split + ": " + std::to_string(images.size(0)) + " images but " +
                             std::to_string(labels.size(0)) + " labels");
  }
  if (size && *size < images.size(0)) {
    images = images.narrow(0, 0, *size);
    labels = labels.narrow(0, 0, *size);
  }
  return {images.reshape({images.size(0), -1}).to(at::kFloat).div_(255.0).contiguous(),
          labels.to(at::kLong).contiguous()};
}

}  // namespace natgrad_examples
