// Subnormal (denormal) floats: keeping them out of natgrad's state, and out of its arithmetic.
//
// Why. A float below the dtype's smallest normal number (float32: 1.18e-38) is subnormal, and
// x86 CPUs take a microcode assist for every arithmetic op that reads or produces one: a GEMM
// over a factor or eigenbasis holding them runs several times slower. They appear once training
// has progressed: the output gradients of dead ReLU units and the softmax residuals of
// confidently classified samples are tiny, their squares (the G factor) or their products with
// eigenvectors are subnormal, and an EMA or a momentum buffer decays such values further.
//
// What natgrad does, without touching the user's floating-point mode:
// * flush_subnormal_ zeroes every subnormal entry of a tensor in place: every factor,
//   decomposition, preconditioned direction and momentum buffer natgrad stores passes through
//   it, so its state holds none, on every platform and thread count.
// * without_subnormals gives an op's input with its subnormal entries zeroed (a copy only when
//   it holds any; one read-only pass otherwise), so the GEMMs never read one.
// natgrad does not set flush-to-zero / denormals-are-zero (MXCSR), not even locally around an
// op: a thread that the OpenMP/MKL runtime creates while the mode is set inherits it for life
// (Linux copies the creating thread's MXCSR), and setting it on a pool thread cannot be
// reliably undone (OpenMP does not promise the same threads serve the restoring region). Both
// were measured here to leak the mode into the user's arithmetic on ATen's pool threads.
// All of them change values only below the smallest normal number, i.e. by less than the
// dtype's absolute resolution near zero.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace natgrad {

// Zeroes entries x with 0 < |x| < finfo(dtype).tiny, in place (NaN/Inf are kept). Returns t.
at::Tensor& flush_subnormal_(at::Tensor& t);
void flush_subnormal_(std::vector<at::Tensor>& tensors);

// Whether any entry of t is subnormal (one host read off the CPU).
bool has_subnormal(const at::Tensor& t);

// t itself when it holds no subnormal entry, else a contiguous copy with them zeroed.
at::Tensor without_subnormals(const at::Tensor& t);

}  // namespace natgrad
