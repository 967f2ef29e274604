// PHM linear (Compacter's parameterized hypercomplex multiplication layer): CPU kernels.
//
// With n = phm_dim, P = in/n, Q = out/n, k = rank and j = i*k + r (nk = n*k):
//   x    [M, n*P]  row stride ldx, unit column stride     rule    [n, n, n]  contiguous
//   W_l  [n, P, k] contiguous                             W_r     [n, k, Q]  contiguous
//   bias [n*Q] or null                                    y, dy   [M, n*Q]   row strides ldy, lddy
//   t    [M, n, n, k] contiguous, t[m][a][j] = sum_p x[m, a*P + p] W_l[i][p][r]
// forward:  u[m][b][j] = sum_a rule[i][a][b] t[m][a][j];  y[m, b*Q + q] = bias + sum_j u[m][b][j] W_r[j][q]
// backward: du[m][b][j] = sum_q dy[m, b*Q + q] W_r[j][q];  dt[m][a][j] = sum_b rule[i][a][b] du[m][b][j]
//   dx[m, a*P + p] = sum_j dt[m][a][j] W_l[i][p][r]       dW_l[i][p][r] = sum_{m,a} x[m, a*P + p] dt[m][a][j]
//   dW_r[j][q] = sum_{m,b} u[m][b][j] dy[m, b*Q + q]      drule[i][a][b] = sum_{m,r} t[m][a][j] du[m][b][j]
//   dbias = sum_m dy[m]
// The Kronecker weight H [in, out] is never formed.  T is float or double.
#pragma once

#include <cstdint>
#include <string>

namespace peftcore {
namespace cpu {

// y (row stride ldy) and t from x; bias may be null.  One OpenMP region over 4-row blocks.
template <typename T>
void phm_fwd(const T* x, int64_t ldx, const T* rule, const T* w_left, const T* w_right,
             const T* bias, T* y, int64_t ldy, T* t, int64_t M, int64_t n, int64_t P, int64_t Q,
             int64_t k, int nthreads);

// Gradients; a null output is not computed (dx [M, n*P] has row stride lddx, the others are
// contiguous in the shapes of their parameters).  The weight gradients are summed per row chunk
// (chunks depend on the shape alone) and the chunks are added in a fixed order: the results do
// not depend on the thread count.
template <typename T>
void phm_bwd(const T* dy, int64_t lddy, const T* x, int64_t ldx, const T* t, const T* rule,
             const T* w_left, const T* w_right, T* dx, int64_t lddx, T* drule, T* dw_left,
             T* dw_right, T* dbias, int64_t M, int64_t n, int64_t P, int64_t Q, int64_t k,
             int nthreads);

}  // namespace cpu

}  // namespace peftcore
