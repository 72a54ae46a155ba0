# cython: boundscheck=False, wraparound=False, cdivision=True
"""Native plan: enqueue a prepared model step through the OpenCL C API with no Python per launch.

Handles cross from pyopencl as intptr_t (`.int_ptr`); pyopencl owns every object, and the plan keeps
Python references to the queue and every kernel so none is released while the plan can run.
"""

from libc.stdint cimport intptr_t, int32_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset

import numpy as np
cimport numpy as cnp

from nextn.errors import CLCallError

cnp.import_array()

cdef extern from "CL/cl.h" nogil:
    ctypedef int cl_int
    ctypedef unsigned int cl_uint
    ctypedef unsigned int cl_bool
    ctypedef void* cl_kernel
    ctypedef void* cl_command_queue
    ctypedef void* cl_mem
    ctypedef void* cl_event
    cl_int CL_SUCCESS
    cl_bool CL_TRUE
    cl_bool CL_FALSE
    cl_int clSetKernelArg(cl_kernel, cl_uint, size_t, const void*)
    cl_int clEnqueueNDRangeKernel(cl_command_queue, cl_kernel, cl_uint, const size_t*, const size_t*,
                                  const size_t*, cl_uint, const cl_event*, cl_event*)
    cl_int clEnqueueWriteBuffer(cl_command_queue, cl_mem, cl_bool, size_t, size_t, const void*, cl_uint,
                                const cl_event*, cl_event*)
    cl_int clEnqueueReadBuffer(cl_command_queue, cl_mem, cl_bool, size_t, size_t, void*, cl_uint,
                               const cl_event*, cl_event*)
    cl_int clFinish(cl_command_queue)


cdef inline int _check(cl_int status, str call) except -1:
    if status != CL_SUCCESS:
        raise CLCallError(call, status)
    return 0


cdef struct LaunchRec:
    cl_kernel kernel
    cl_uint work_dim
    size_t gconst[3]
    size_t gmul[3]
    size_t local[3]
    int has_local
    int scale_var
    int dyn_begin
    int dyn_end


cdef struct DynArg:
    cl_uint arg_index
    int var_index
    int32_t last
    int is_set


cdef class Plan:
    """Prepared launches of one step; `run(vars)` enqueues them all (no wait)."""

    cdef LaunchRec* recs
    cdef DynArg* dyn
    cdef int n
    cdef int n_dyn
    cdef cl_command_queue queue
    cdef object _keep  # the queue and the kernels, kept alive for the plan's life

    def __cinit__(self):
        self.recs = NULL
        self.dyn = NULL

    def __init__(self, queue, launches):
        launches = list(launches)
        self.n = len(launches)
        self.n_dyn = sum(len(l.dyn_args) for l in launches)
        self.recs = <LaunchRec*>malloc(max(self.n, 1) * sizeof(LaunchRec))
        self.dyn = <DynArg*>malloc(max(self.n_dyn, 1) * sizeof(DynArg))
        if self.recs == NULL or self.dyn == NULL:
            raise MemoryError()
        memset(self.recs, 0, max(self.n, 1) * sizeof(LaunchRec))
        memset(self.dyn, 0, max(self.n_dyn, 1) * sizeof(DynArg))
        self.queue = <cl_command_queue><intptr_t>queue.int_ptr
        self._keep = (queue, [l.kernel for l in launches])
        cdef int i, d, k = 0
        for i, l in enumerate(launches):
            dims = len(l.global_const)
            if not 1 <= dims <= 3 or len(l.global_per_token) != dims or (l.local is not None and len(l.local) != dims):
                raise ValueError(f"launch {i} ({l.name}): inconsistent work dimensions")
            self.recs[i].kernel = <cl_kernel><intptr_t>l.kernel.int_ptr
            self.recs[i].work_dim = dims
            self.recs[i].has_local = l.local is not None
            self.recs[i].scale_var = l.scale_var
            for d in range(dims):
                self.recs[i].gconst[d] = l.global_const[d]
                self.recs[i].gmul[d] = l.global_per_token[d]
                self.recs[i].local[d] = l.local[d] if l.local is not None else 0
            self.recs[i].dyn_begin = k
            for arg_index, var_index in l.dyn_args:
                self.dyn[k].arg_index = arg_index
                self.dyn[k].var_index = var_index
                self.dyn[k].is_set = 0
                k += 1
            self.recs[i].dyn_end = k

    def __dealloc__(self):
        free(self.recs)
        free(self.dyn)

    @property
    def n_launches(self):
        return self.n

    def run(self, int32_t[::1] vars not None):
        cdef int i, j, d, nvars = vars.shape[0]
        cdef cl_int status = CL_SUCCESS
        cdef int failed = -1
        cdef const char* call = b""
        cdef size_t g[3]
        cdef size_t c, loc
        cdef int32_t v
        cdef LaunchRec* r
        cdef int32_t* vp = &vars[0]
        for i in range(self.n):
            r = &self.recs[i]
            if r.scale_var >= nvars:
                raise IndexError(f"launch {i} scales with step variable {r.scale_var}; only {nvars} given")
            for j in range(r.dyn_begin, r.dyn_end):
                if self.dyn[j].var_index >= nvars:
                    raise IndexError(f"launch {i} reads step variable {self.dyn[j].var_index}; only {nvars} given")
        with nogil:
            for i in range(self.n):
                r = &self.recs[i]
                for j in range(r.dyn_begin, r.dyn_end):
                    v = vp[self.dyn[j].var_index]
                    if not self.dyn[j].is_set or self.dyn[j].last != v:
                        status = clSetKernelArg(r.kernel, self.dyn[j].arg_index, sizeof(int32_t), &v)
                        if status != CL_SUCCESS:
                            failed = i
                            call = b"clSetKernelArg"
                            break
                        self.dyn[j].last = v
                        self.dyn[j].is_set = 1
                if failed >= 0:
                    break
                for d in range(<int>r.work_dim):
                    c = r.gconst[d] + r.gmul[d] * <size_t>(vp[r.scale_var] if vp[r.scale_var] > 0 else 0)
                    if r.has_local and r.local[d]:
                        loc = r.local[d]
                        c = (c + loc - 1) // loc * loc
                        if c < loc:
                            c = loc
                    elif c < 1:
                        c = 1
                    g[d] = c
                status = clEnqueueNDRangeKernel(self.queue, r.kernel, r.work_dim, NULL, g,
                                                r.local if r.has_local else NULL, 0, NULL, NULL)
                if status != CL_SUCCESS:
                    failed = i
                    call = b"clEnqueueNDRangeKernel"
                    break
        if failed >= 0:
            raise CLCallError(f"{call.decode()} (launch {failed})", status)


def enqueue_write(queue, buffer, cnp.ndarray array not None, size_t offset_bytes=0):
    """Non-blocking write of a contiguous host array; the caller keeps `array` alive until the queue finishes."""
    if not array.flags.c_contiguous:
        raise ValueError("enqueue_write needs a C-contiguous array")
    cdef cl_command_queue q = <cl_command_queue><intptr_t>queue.int_ptr
    cdef cl_mem m = <cl_mem><intptr_t>buffer.int_ptr
    cdef size_t nbytes = array.nbytes
    cdef void* ptr = cnp.PyArray_DATA(array)
    cdef cl_int status
    if nbytes == 0:
        return
    with nogil:
        status = clEnqueueWriteBuffer(q, m, CL_FALSE, offset_bytes, nbytes, ptr, 0, NULL, NULL)
    _check(status, "clEnqueueWriteBuffer")


def enqueue_read(queue, buffer, cnp.ndarray array not None, size_t offset_bytes=0):
    """Blocking read into a contiguous host array (waits for everything queued before it)."""
    if not array.flags.c_contiguous or not array.flags.writeable:
        raise ValueError("enqueue_read needs a writeable C-contiguous array")
    cdef cl_command_queue q = <cl_command_queue><intptr_t>queue.int_ptr
    cdef cl_mem m = <cl_mem><intptr_t>buffer.int_ptr
    cdef size_t nbytes = array.nbytes
    cdef void* ptr = cnp.PyArray_DATA(array)
    cdef cl_int status
    if nbytes == 0:
        return
    with nogil:
        status = clEnqueueReadBuffer(q, m, CL_TRUE, offset_bytes, nbytes, ptr, 0, NULL, NULL)
    _check(status, "clEnqueueReadBuffer")


def finish(queue):
    cdef cl_command_queue q = <cl_command_queue><intptr_t>queue.int_ptr
    cdef cl_int status
    with nogil:
        status = clFinish(q)
    _check(status, "clFinish")
