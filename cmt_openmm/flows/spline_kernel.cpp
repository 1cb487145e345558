// The rational-quadratic spline of cmt_openmm/flows/splines.py, fused: one pass per block of
// columns computes what spline_forward computes with ~45 tensor operations (and spline_backward
// with ~50), recomputing the forward quantities in the backward pass instead of saving them.
// Built and loaded by spline_kernel.py; the formulas and their order follow splines.py.
//
// Layout: row j (a coordinate, 0..D-1), column b (a sample); every (D, B) array has its columns
// contiguous (stride 1) and a row stride; bins (K, 2, D, B) and derivatives (K + 1, D, B) have
// strides for k, for width/height and for j. Columns are processed in blocks of kBlock with the
// column loop innermost, so the compiler vectorises it (exp, log and sqrt from libmvec).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;

template <typename T>
inline T softplus(T v) {  // torch.nn.functional.softplus (beta 1, threshold 20)
  return v > T(20) ? v : std::log1p(std::exp(v));
}

// d softplus / d v = sigmoid(v), from exp(-|v|) <= 1: 1 / (1 + exp(-v)) overflows to 1 / inf for
// v < -88 in float32, which -ffast-math (no infinities assumed) turns into NaN instead of 0.
template <typename T>
inline T sigmoid(T v) {
  const T e = std::exp(-std::abs(v));
  return (v >= T(0) ? T(1) : e) / (T(1) + e);
}

// One element's spline in its bin: the quantities both passes use (names as in splines.py).
template <typename T>
struct Element {
  T x0, y0, p0, p1, wd, ht, d0, d1, inv_w, s, slack, dy, theta, one_minus, t1, theta2, inv_denom, ratio, q;
};

// x: the input; S0, S1: sums of exp(bins); knot0, knot1: knot idx times S / scale; e0, e1: exp of bin
// idx; r0, r1: raw derivatives at knots idx and idx + 1.
template <typename T, bool kInverse>
inline __attribute__((always_inline)) Element<T> element(T x, T S0, T S1, T knot0, T knot1, T e0, T e1, T r0, T r1,
                                                         T scale, T min_bin, T min_der) {
  Element<T> v;
  const T its0 = scale / S0, its1 = scale / S1;
  v.x0 = knot0 * its0;
  v.y0 = knot1 * its1;
  v.p0 = e0 * its0;
  v.p1 = e1 * its1;
  v.wd = v.p0 + min_bin;
  v.ht = v.p1 + min_bin;
  v.d0 = softplus(r0) + min_der;
  v.d1 = softplus(r1) + min_der;
  v.inv_w = T(1) / v.wd;
  v.s = v.ht * v.inv_w;
  v.slack = v.d0 + v.d1 - T(2) * v.s;
  T theta;
  if (kInverse) {  // theta solves x = y0 + h R(theta), the stable root of a quadratic
    v.dy = x - v.y0;
    const T dy_slack = v.dy * v.slack;
    const T qa = dy_slack + v.ht * (v.s - v.d0), neg_b = dy_slack - v.ht * v.d0, neg_c = v.s * v.dy;
    const T disc = neg_b * neg_b + T(4) * qa * neg_c;
    const T root = std::sqrt(disc > T(0) ? disc : T(0));
    theta = neg_c / (root - neg_b) * T(2);
  } else {
    v.dy = T(0);
    theta = (x - v.x0) * v.inv_w;
  }
  v.theta = theta < T(0) ? T(0) : (theta > T(1) ? T(1) : theta);
  v.one_minus = T(1) - v.theta;
  v.t1 = v.theta * v.one_minus;
  v.theta2 = v.theta * v.theta;
  v.inv_denom = T(1) / (v.s + v.slack * v.t1);
  v.ratio = v.s * v.inv_denom;
  v.q = v.d1 * v.theta2 + T(2) * v.s * v.t1 + v.d0 * v.one_minus * v.one_minus;
  return v;
}

template <typename T>
struct Args {
  int64_t K, D;
  bool inverse, backward;
  T min_bin, min_der;
  const T* x; int64_t sx;
  const T* bins; int64_t sbk, sbw, sbd;
  const T* der; int64_t sdk, sdd;
  T* out; int64_t so;
  T* logdet; int64_t sl;
  const T* g_out; int64_t sgo;
  const T* g_logdet; int64_t sgl;
  T* g_x; int64_t sgx;
  T* g_bins; int64_t sgbk, sgbw, sgbd;
  T* g_der; int64_t sgdk, sgdd;
};

// One row j, columns [b0, b0 + n), n <= kBlock. e: scratch of K * 2 * kBlock.
template <typename T, bool kInverse>
void row_block(const Args<T>& a, int64_t j, int64_t b0, int64_t n, T* __restrict e) {
  const int64_t K = a.K;
  const T min_bin = a.min_bin, min_der = a.min_der;
  const T scale = T(1) - min_bin * T(K);
  const T inv_scale = T(1) / scale;
  const T mbs = min_bin / scale;  // min_bin / scale: knot j times S / scale gains j mbs S
  constexpr int row = kInverse ? 1 : 0;
  const T* A = a.bins + j * a.sbd + b0;
  const T* R = a.der + j * a.sdd + b0;
  const T* X = a.x + j * a.sx + b0;

  T m[2][kBlock], S[2][kBlock], cum[2][kBlock], knot[2][kBlock], esel[2][kBlock];
  T r0[kBlock], r1[kBlock], idx[kBlock], thr[kBlock];
  for (int w = 0; w < 2; ++w) {
    const T* Aw = A + w * a.sbw;
#pragma omp simd
    for (int64_t b = 0; b < n; ++b) m[w][b] = Aw[b];
    for (int64_t k = 1; k < K; ++k) {
      const T* Ak = Aw + k * a.sbk;
#pragma omp simd
      for (int64_t b = 0; b < n; ++b) m[w][b] = std::max(m[w][b], Ak[b]);
    }
#pragma omp simd
    for (int64_t b = 0; b < n; ++b) S[w][b] = T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T* Ak = Aw + k * a.sbk;
      T* ek = e + (k * 2 + w) * kBlock;
#pragma omp simd
      for (int64_t b = 0; b < n; ++b) {
        ek[b] = std::exp(Ak[b] - m[w][b]);
        S[w][b] += ek[b];
      }
    }
  }
  // bin index: the number of inner knots (1..K-1) at or below x, and the bin's values with it
#pragma omp simd
  for (int64_t b = 0; b < n; ++b) {
    thr[b] = X[b] * S[row][b] * inv_scale;
    idx[b] = T(0);
    r0[b] = R[b];
    r1[b] = R[a.sdk + b];
    for (int w = 0; w < 2; ++w) {
      cum[w][b] = T(0);
      knot[w][b] = T(0);
      esel[w][b] = e[w * kBlock + b];
    }
  }
  for (int64_t k = 1; k < K; ++k) {
    const T* Rk = R + k * a.sdk;
    const T* e0 = e + ((k - 1) * 2) * kBlock;
    const T* e1 = e0 + kBlock;
    const T* ek0 = e + (k * 2) * kBlock;
    const T* ek1 = ek0 + kBlock;
#pragma omp simd
    for (int64_t b = 0; b < n; ++b) {
      cum[0][b] += e0[b];
      cum[1][b] += e1[b];
      const T k0 = cum[0][b] + T(k) * mbs * S[0][b];
      const T k1 = cum[1][b] + T(k) * mbs * S[1][b];
      const bool at = thr[b] >= (kInverse ? k1 : k0);
      idx[b] = at ? T(k) : idx[b];
      knot[0][b] = at ? k0 : knot[0][b];
      knot[1][b] = at ? k1 : knot[1][b];
      esel[0][b] = at ? ek0[b] : esel[0][b];
      esel[1][b] = at ? ek1[b] : esel[1][b];
      r0[b] = at ? Rk[b] : r0[b];
      r1[b] = at ? Rk[a.sdk + b] : r1[b];
    }
  }

  if (!a.backward) {
    T* __restrict O = a.out + j * a.so + b0;
    T* __restrict L = a.logdet + j * a.sl + b0;
#pragma omp simd
    for (int64_t b = 0; b < n; ++b) {
      const Element<T> v = element<T, kInverse>(X[b], S[0][b], S[1][b], knot[0][b], knot[1][b], esel[0][b],
                                                esel[1][b], r0[b], r1[b], scale, min_bin, min_der);
      const T ld = std::log(v.q * v.ratio * v.ratio);
      if (kInverse) {
        O[b] = v.x0 + v.theta * v.wd;
        L[b] = -ld;
      } else {
        O[b] = v.y0 + v.ht * ((v.s * v.theta2 + v.d0 * v.t1) * v.inv_denom);
        L[b] = ld;
      }
    }
    return;
  }

  // backward: the gradients of spline_backward, per element
  const T* GO = a.g_out + j * a.sgo + b0;
  const T* GL = a.g_logdet + j * a.sgl + b0;
  T* __restrict GX = a.g_x + j * a.sgx + b0;
  T gk[2][kBlock], tt[2][kBlock], gsize_p[2][kBlock], gs0[kBlock], gs1[kBlock];
#pragma omp simd
  for (int64_t b = 0; b < n; ++b) {
    const Element<T> v = element<T, kInverse>(X[b], S[0][b], S[1][b], knot[0][b], knot[1][b], esel[0][b],
                                              esel[1][b], r0[b], r1[b], scale, min_bin, min_der);
    const T its0 = scale / S[0][b], its1 = scale / S[1][b];
    const T p0 = v.p0, p1 = v.p1, wd = v.wd, ht = v.ht, d0 = v.d0, d1 = v.d1, inv_w = v.inv_w, s = v.s;
    const T slack = v.slack, dy = v.dy, theta = v.theta, one_minus = v.one_minus, t1 = v.t1, theta2 = v.theta2;
    const T inv_denom = v.inv_denom, ratio = v.ratio, q = v.q;
    const T inv_q = T(1) / q, one_m2theta = one_minus - theta;
    const T half_dl_dtheta = (d1 * theta + s * one_m2theta - d0 * one_minus) * inv_q - slack * one_m2theta * inv_denom;
    const T dout_dtheta = ht * q * ratio * inv_denom;
    const T go = GO[b], gl = GL[b];
    T g_in, a_out, a_l, g_x0, g_w, r;
    if (kInverse) {
      g_in = (go * wd - T(2) * gl * half_dl_dtheta) / dout_dtheta;
      a_out = -g_in;
      a_l = -gl;
      g_x0 = go;
      g_w = go * theta;
      r = dy / ht;
    } else {
      g_in = (go * dout_dtheta + T(2) * gl * half_dl_dtheta) * inv_w;
      a_out = go;
      a_l = gl;
      g_x0 = -g_in;
      g_w = g_x0 * theta;
      r = (s * theta2 + d0 * t1) * inv_denom;
    }
    GX[b] = g_in;
    const T g_y0 = a_out;
    const T a_out_h_d = a_out * ht * inv_denom;
    const T one_m2t1 = T(1) - T(2) * t1;
    const T g_s = (theta2 - r * one_m2t1) * a_out_h_d + T(2) * a_l * (T(1) / s + t1 * inv_q - one_m2t1 * inv_denom);
    const T g_h = a_out * r + g_s * inv_w;
    g_w -= g_s * s * inv_w;
    const T t1_d = t1 * inv_denom, t1_r = t1 * r;
    const T g_d0 = (t1 - t1_r) * a_out_h_d + a_l * (one_minus * one_minus * inv_q - T(2) * t1_d);
    const T g_d1 = a_l * (theta2 * inv_q - T(2) * t1_d) - a_out_h_d * t1_r;
    // bins: dL/da_k = e_k (scale / S (g_knot [k < idx] + g_size [k = idx]) - sum_i p_i dL/dp_i / S ...)
    const T c0 = knot[0][b] * its0 - idx[b] * min_bin, c1 = knot[1][b] * its1 - idx[b] * min_bin;
    tt[0][b] = (c0 * g_x0 + g_w * p0) * its0 * inv_scale;
    tt[1][b] = (c1 * g_y0 + g_h * p1) * its1 * inv_scale;
    gk[0][b] = g_x0 * its0;
    gk[1][b] = g_y0 * its1;
    gsize_p[0][b] = g_w * p0;
    gsize_p[1][b] = g_h * p1;
    gs0[b] = g_d0 * sigmoid(r0[b]);  // d softplus / d raw
    gs1[b] = g_d1 * sigmoid(r1[b]);
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int w = 0; w < 2; ++w) {
      const T* ek = e + (k * 2 + w) * kBlock;
      T* __restrict G = a.g_bins + k * a.sgbk + w * a.sgbw + j * a.sgbd + b0;
#pragma omp simd
      for (int64_t b = 0; b < n; ++b) {
        const T below = T(k) < idx[b] ? gk[w][b] : T(0);
        const T at = T(k) == idx[b] ? gsize_p[w][b] : T(0);
        G[b] = ek[b] * (below - tt[w][b]) + at;
      }
    }
  }
  for (int64_t k = 0; k <= K; ++k) {
    T* __restrict G = a.g_der + k * a.sgdk + j * a.sgdd + b0;
#pragma omp simd
    for (int64_t b = 0; b < n; ++b) {
      G[b] = (T(k) == idx[b] ? gs0[b] : T(0)) + (T(k) == idx[b] + T(1) ? gs1[b] : T(0));
    }
  }
}

template <typename T>
void run(const Args<T>& a, int64_t B) {
  std::vector<T> e(static_cast<size_t>(a.K) * 2 * kBlock);
  for (int64_t j = 0; j < a.D; ++j)
    for (int64_t b0 = 0; b0 < B; b0 += kBlock) {
      const int64_t n = std::min(kBlock, B - b0);
      if (a.inverse)
        row_block<T, true>(a, j, b0, n, e.data());
      else
        row_block<T, false>(a, j, b0, n, e.data());
    }
}

}  // namespace

#define CMT_SPLINE(NAME, T)                                                                                  \
  extern "C" void NAME(int64_t K, int64_t D, int64_t B, int32_t inverse, int32_t backward,                  \
                       double min_bin, double min_der, const T* x, int64_t sx, const T* bins, int64_t sbk,      \
                       int64_t sbw, int64_t sbd, const T* der, int64_t sdk, int64_t sdd, T* out, int64_t so,    \
                       T* logdet, int64_t sl, const T* g_out, int64_t sgo, const T* g_logdet, int64_t sgl,      \
                       T* g_x, int64_t sgx, T* g_bins, int64_t sgbk, int64_t sgbw, int64_t sgbd, T* g_der,      \
                       int64_t sgdk, int64_t sgdd) {                                                            \
    Args<T> a{K, D, inverse != 0, backward != 0, T(min_bin), T(min_der), x, sx, bins, sbk, sbw, sbd, der, sdk,   \
              sdd, out, so, logdet, sl, g_out, sgo, g_logdet, sgl, g_x, sgx, g_bins, sgbk, sgbw, sgbd, g_der,   \
              sgdk, sgdd};                                                                                      \
    run(a, B);                                                                                                  \
  }

CMT_SPLINE(cmt_rq_spline_f32, float)
CMT_SPLINE(cmt_rq_spline_f64, double)
