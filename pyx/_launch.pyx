# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Native plan: enqueue a prepared model step through the OpenCL C API with no Python per launch.

Handles cross from pyopencl as intptr_t (`.int_ptr`); pyopencl owns every object, and the plan keeps
Python references to the queue and every kernel so none is released while the plan can run.

The plain-pyopencl twin with the same interface and semantics is nextn.cl.plan.PyPlan; the two share the
per-kernel record of dynamic argument values (see `_dyn_cache`), so plans of either kind over the same
kernels may be mixed freely.
"""

from libc.stdint cimport intptr_t, int32_t, int64_t, INT64_MIN
from libc.stdlib cimport malloc, free
from libc.string cimport memset

import numpy as np
cimport numpy as cnp
import pyopencl as cl

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


# Marks an argument of the per-kernel cache that no plan has set yet (a real value is an int32).
DYN_UNSET = INT64_MIN
# Attribute of a pyopencl Kernel holding its dyn-argument cache; nextn.cl.plan uses the same name.
DYN_CACHE_ATTR = "_nextn_dyn_args"


cdef inline int _check(cl_int status, str call) except -1:
    if status != CL_SUCCESS:
        raise CLCallError(call, status)
    return 0


cdef object _launch_error(str call, cl_int status, int index, str name):
    """CLCallError(call, status) whose message also names the status and the launch of the plan that failed
    (`.call` stays the bare OpenCL function name)."""
    err = CLCallError(call, status)
    err.launch_index = index
    err.launch_name = name
    status_name = cl.status_code.to_string(status, "unknown")
    err.args = (f"{err} ({status_name}) at launch {index} ({name or 'unnamed'})",)
    return err


def _dyn_cache(kernel, reset_args=()):
    """The int64 array of the values this kernel's dyn arguments were last set to by any plan.

    It lives on the kernel object itself so that every plan over the kernel, native or pyopencl, sees the
    same record: "set only when it changed since the kernel's last launch" stays true when one kernel
    serves several plans. A plan resets the entries of its own dyn args when it is built, so values set
    directly with kernel.set_arg before that are never mistaken for current.
    """
    cache = getattr(kernel, DYN_CACHE_ATTR, None)
    if cache is None:
        cache = np.full(int(kernel.num_args), DYN_UNSET, np.int64)
        setattr(kernel, DYN_CACHE_ATTR, cache)
    for a in reset_args:
        cache[a] = DYN_UNSET
    return cache


def _check_launch(int index, launch, int num_args):
    """ValueError naming the launch for anything the OpenCL call would reject less clearly (or not at all)."""
    where = f"launch {index} ({launch.name or 'unnamed'})"
    dims = len(launch.global_const)
    if not 1 <= dims <= 3 or len(launch.global_per_token) != dims:
        raise ValueError(f"{where}: global_const and global_per_token must both have 1 to 3 dimensions")
    if launch.local is not None and (len(launch.local) != dims or any(int(l) <= 0 for l in launch.local)):
        raise ValueError(f"{where}: local size {launch.local} must be positive and have {dims} dimensions")
    if launch.scale_var < 0:
        raise ValueError(f"{where}: scale_var {launch.scale_var} is negative")
    if launch.grid_vars is not None and (len(launch.grid_vars) != dims or min(launch.grid_vars) < 0):
        raise ValueError(f"{where}: grid_vars {launch.grid_vars} must name {dims} step variables")
    if launch.run_if is not None and launch.run_if[0] < 0:
        raise ValueError(f"{where}: run_if reads negative step variable {launch.run_if[0]}")
    for arg_index, var_index in launch.dyn_args:
        if not 0 <= arg_index < num_args:
            raise ValueError(f"{where}: dyn arg index {arg_index} out of range (kernel has {num_args} args)")
        if var_index < 0:
            raise ValueError(f"{where}: dyn arg {arg_index} reads negative step variable {var_index}")


def _check_queue(queue):
    # Launch i+1 reads what launch i wrote, and a blocking read stands for "everything before it is done":
    # both hold only on an in-order queue.
    if queue.properties & cl.command_queue_properties.OUT_OF_ORDER_EXEC_MODE_ENABLE:
        raise ValueError("plans and per-step I/O need an in-order command queue")


cdef struct LaunchRec:
    cl_kernel kernel
    cl_uint work_dim
    int has_local
    int svar[3]  # the step variable of each dimension (Launch.grid_var)
    int cond_var  # enqueued only when vars[cond_var] >= cond_min (Launch.run_if; cond_var -1: always)
    int cond_min
    int dyn_begin  # this launch's dyn args are dyn[dyn_begin:dyn_end]
    int dyn_end
    int64_t gconst[3]
    int64_t gmul[3]
    size_t local[3]


cdef struct DynArg:
    cl_uint arg_index
    int var_index
    int64_t* last  # the kernel's shared cache entry for this argument (see _dyn_cache)


cdef class Plan:
    """Prepared launches of one step; `run(vars)` enqueues them all and returns at once (no wait, no flush).

    One thread at a time may run plans that share kernels: kernel arguments are per-kernel state in OpenCL.
    """

    cdef LaunchRec* recs
    cdef DynArg* dyn
    cdef int n
    cdef int n_vars_needed  # 1 + the largest step variable index any launch reads
    cdef cl_command_queue queue
    cdef object _keep  # the queue, the kernels and their dyn caches: alive as long as the plan
    cdef list _names

    def __cinit__(self):
        self.recs = NULL
        self.dyn = NULL

    def __init__(self, queue, launches):
        launches = list(launches)
        _check_queue(queue)
        cdef int n_dyn = sum(len(l.dyn_args) for l in launches)
        self.n = len(launches)
        self.recs = <LaunchRec*>malloc(max(self.n, 1) * sizeof(LaunchRec))
        self.dyn = <DynArg*>malloc(max(n_dyn, 1) * sizeof(DynArg))
        if self.recs == NULL or self.dyn == NULL:
            raise MemoryError()
        memset(self.recs, 0, max(self.n, 1) * sizeof(LaunchRec))
        memset(self.dyn, 0, max(n_dyn, 1) * sizeof(DynArg))
        self.queue = <cl_command_queue><intptr_t>queue.int_ptr
        self._names = [l.name for l in launches]
        caches = []
        self.n_vars_needed = 0
        cdef int i, d, k = 0, arg_index, var_index
        cdef int64_t[::1] cache
        for i, l in enumerate(launches):
            if l.kernel is None:
                raise ValueError(f"launch {i} ({l.name or 'unnamed'}) has no kernel")
            _check_launch(i, l, int(l.kernel.num_args))
            cache = _dyn_cache(l.kernel, [a for a, _ in l.dyn_args])
            caches.append(cache)
            dims = len(l.global_const)
            self.recs[i].kernel = <cl_kernel><intptr_t>l.kernel.int_ptr
            self.recs[i].work_dim = dims
            self.recs[i].has_local = l.local is not None
            self.recs[i].cond_var = l.run_if[0] if l.run_if is not None else -1
            self.recs[i].cond_min = l.run_if[1] if l.run_if is not None else 0
            self.n_vars_needed = max(self.n_vars_needed, self.recs[i].cond_var + 1)
            for d in range(dims):
                self.recs[i].svar[d] = l.grid_var(d)
                self.n_vars_needed = max(self.n_vars_needed, l.grid_var(d) + 1)
                self.recs[i].gconst[d] = l.global_const[d]
                self.recs[i].gmul[d] = l.global_per_token[d]
                self.recs[i].local[d] = l.local[d] if l.local is not None else 0
            self.recs[i].dyn_begin = k
            for arg_index, var_index in l.dyn_args:
                self.dyn[k].arg_index = arg_index
                self.dyn[k].var_index = var_index
                self.dyn[k].last = &cache[arg_index]
                self.n_vars_needed = max(self.n_vars_needed, var_index + 1)
                k += 1
            self.recs[i].dyn_end = k
        self._keep = (queue, [l.kernel for l in launches], caches)

    def __dealloc__(self):
        free(self.recs)
        free(self.dyn)

    @property
    def n_launches(self):
        return self.n

    def run(self, const int32_t[::1] vars not None):
        """Set the changed dyn args and enqueue every launch, in order, from C with the GIL released."""
        if vars.shape[0] < self.n_vars_needed:
            raise IndexError(f"plan reads {self.n_vars_needed} step variables; {vars.shape[0]} given")
        if self.n == 0:
            return
        cdef int i, j, d
        cdef cl_int status = CL_SUCCESS
        cdef int failed = -1
        cdef int failed_call = 0  # 0: clSetKernelArg, 1: clEnqueueNDRangeKernel
        cdef size_t g[3]
        cdef int64_t c, loc
        cdef int32_t v
        cdef LaunchRec* r
        cdef DynArg* a
        cdef const int32_t* vp = &vars[0]
        with nogil:
            for i in range(self.n):
                r = &self.recs[i]
                if r.cond_var >= 0 and vp[r.cond_var] < r.cond_min:
                    continue
                for j in range(r.dyn_begin, r.dyn_end):
                    a = &self.dyn[j]
                    v = vp[a.var_index]
                    if a.last[0] != <int64_t>v:
                        status = clSetKernelArg(r.kernel, a.arg_index, sizeof(int32_t), &v)
                        if status != CL_SUCCESS:
                            failed = i
                            break
                        a.last[0] = v
                if failed >= 0:
                    break
                # Launch.global_size, in the same signed arithmetic: const + per_token * var, rounded up to
                # the local size (ceiling division that also holds for negative values), at least one
                # work-group (or one work-item without a local size).
                for d in range(<int>r.work_dim):
                    c = r.gconst[d] + r.gmul[d] * <int64_t>vp[r.svar[d]]
                    if r.has_local:
                        loc = <int64_t>r.local[d]
                        c = ((c + loc - 1) // loc if c >= 0 else -((-c) // loc)) * loc
                        if c < loc:
                            c = loc
                    elif c < 1:
                        c = 1
                    g[d] = <size_t>c
                status = clEnqueueNDRangeKernel(self.queue, r.kernel, r.work_dim, NULL, g,
                                                r.local if r.has_local else NULL, 0, NULL, NULL)
                if status != CL_SUCCESS:
                    failed = i
                    failed_call = 1
                    break
        if failed >= 0:
            call = "clEnqueueNDRangeKernel" if failed_call else "clSetKernelArg"
            raise _launch_error(call, status, failed, self._names[failed])


# Host arrays of non-blocking writes that may still be in flight, per queue (int_ptr -> list). The module
# keeps them alive, so a caller may pass a temporary: they are dropped once the queue is known to have
# passed them (finish, or a blocking read, which on an in-order queue completes after every earlier
# command), and a queue that collects more than _MAX_HELD is finished to bound the list.
cdef dict _held = {}
cdef int _MAX_HELD = 256


cdef int _release_held(intptr_t qp) except -1:
    # Empty the list rather than drop it: its presence means the queue was already checked for order.
    held = _held.get(qp)
    if held:
        held.clear()
    return 0


def enqueue_write(queue, buffer, cnp.ndarray array not None, size_t offset_bytes=0):
    """Non-blocking write of a C-contiguous host array into `buffer` at `offset_bytes`.

    The module holds a reference to `array` until the queue is finished or a blocking read on it returns,
    so the caller need not keep it; the caller must not modify it before then.
    """
    if not cnp.PyArray_IS_C_CONTIGUOUS(array):
        raise ValueError("enqueue_write needs a C-contiguous array")
    cdef size_t nbytes = array.nbytes
    if nbytes == 0:
        return
    cdef intptr_t qp = queue.int_ptr
    held = _held.get(qp)
    if held is None:
        _check_queue(queue)  # once per queue
        held = _held[qp] = []
    cdef cl_command_queue q = <cl_command_queue>qp
    cdef cl_mem m = <cl_mem><intptr_t>buffer.int_ptr
    cdef const void* ptr = cnp.PyArray_DATA(array)
    cdef cl_int status
    with nogil:
        status = clEnqueueWriteBuffer(q, m, CL_FALSE, offset_bytes, nbytes, ptr, 0, NULL, NULL)
    _check(status, "clEnqueueWriteBuffer")
    held.append(array)
    if len(held) > _MAX_HELD:
        finish(queue)


def enqueue_read(queue, buffer, cnp.ndarray array not None, size_t offset_bytes=0):
    """Blocking read into a writeable C-contiguous host array; waits for everything queued before it."""
    if not cnp.PyArray_IS_C_CONTIGUOUS(array) or not cnp.PyArray_ISWRITEABLE(array):
        raise ValueError("enqueue_read needs a writeable C-contiguous array")
    cdef size_t nbytes = array.nbytes
    if nbytes == 0:
        return
    cdef intptr_t qp = queue.int_ptr
    cdef cl_command_queue q = <cl_command_queue>qp
    cdef cl_mem m = <cl_mem><intptr_t>buffer.int_ptr
    cdef void* ptr = cnp.PyArray_DATA(array)
    cdef cl_int status
    with nogil:
        status = clEnqueueReadBuffer(q, m, CL_TRUE, offset_bytes, nbytes, ptr, 0, NULL, NULL)
    _check(status, "clEnqueueReadBuffer")
    _release_held(qp)  # in order: every earlier write has completed


def finish(queue):
    """Wait until every command on the queue has completed (clFinish)."""
    cdef intptr_t qp = queue.int_ptr
    cdef cl_command_queue q = <cl_command_queue>qp
    cdef cl_int status
    with nogil:
        status = clFinish(q)
    _check(status, "clFinish")
    _release_held(qp)
