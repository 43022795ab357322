/* A stand-in for NVIDIA's libnvfm.so.1 (the Fabric Manager SDK's client library), for the
 * tests: the same ABI (guestinit/nvidia/fm_sdk.h), talking to the fabric manager stand-in
 * (guestinit/testing/fake_fabric.py) instead of a real nv-fabricmanager.
 *
 * Like the real library it is a client: the partition table and which partitions are
 * active live in the fabric manager process, so they are gone when it restarts, and
 * fmSetActivatedFabricPartitions tells a restarted one again. The wire between the two
 * stand-ins is ours, one request line and a reply ending in ".":
 *   LIST        -> "P id active ngpus" then per GPU "G physid uuid bdf links maxlinks rate"
 *   ACTIVATE id, DEACTIVATE id, SET id...  -> "."
 *   UNSUPPORTED -> "U id physid,physid..." lines;  FAILED -> "F gpu|switch uuid bdf port,..."
 * and "E code" (an fmReturn_t) instead when the fabric manager refuses.
 * Build: gcc -shared -fPIC -I guestinit/nvidia -o libnvfm.so.1 libnvfm_standin.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "fm_sdk.h"

#define REPLY_MAX (256 * 1024)

struct conn {
    int fd;
};

static int initialized;

fmReturn_t fmLibInit(void)
{
    if (initialized)
        return FM_ST_IN_USE;
    initialized = 1;
    return FM_ST_SUCCESS;
}

fmReturn_t fmLibShutdown(void)
{
    if (!initialized)
        return FM_ST_UNINITIALIZED;
    initialized = 0;
    return FM_ST_SUCCESS;
}

static int dial(const fmConnectParams_t *p)
{
    int fd;
    if (p->addressIsUnixSocket) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        if (strlen(p->addressInfo) >= sizeof sa.sun_path)
            return -1;
        strcpy(sa.sun_path, p->addressInfo);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0)
            return fd;
    } else {
        char host[FM_MAX_STR_LENGTH];
        unsigned port = FM_CMD_PORT_NUMBER;
        snprintf(host, sizeof host, "%s", p->addressInfo);
        char *colon = strchr(host, ':');
        if (colon) {
            *colon = '\0';
            port = (unsigned)strtoul(colon + 1, NULL, 10);
        }
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
            return -2;
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0)
            return fd;
    }
    if (fd >= 0)
        close(fd);
    return -1;
}

fmReturn_t fmConnect(fmConnectParams_t *p, fmHandle_t *handle)
{
    if (!initialized)
        return FM_ST_UNINITIALIZED;
    if (p == NULL || handle == NULL)
        return FM_ST_BADPARAM;
    if (p->version != FM_PARAM_VERSION(fmConnectParams_t, 1))
        return FM_ST_VERSION_MISMATCH;
    int fd = dial(p);
    if (fd == -2)
        return FM_ST_BADPARAM;
    if (fd < 0)
        return FM_ST_CONNECTION_NOT_VALID;
    struct conn *c = calloc(1, sizeof *c);
    if (c == NULL) {
        close(fd);
        return FM_ST_GENERIC_ERROR;
    }
    c->fd = fd;
    *handle = c;
    return FM_ST_SUCCESS;
}

fmReturn_t fmDisconnect(fmHandle_t handle)
{
    if (!initialized)
        return FM_ST_UNINITIALIZED;
    if (handle == NULL)
        return FM_ST_BADPARAM;
    struct conn *c = handle;
    close(c->fd);
    free(c);
    return FM_ST_SUCCESS;
}

/* Send ``request``, read the reply up to its "." line into ``out`` (NUL-terminated). */
static fmReturn_t ask(fmHandle_t handle, const char *request, char *out, size_t size)
{
    if (!initialized)
        return FM_ST_UNINITIALIZED;
    if (handle == NULL)
        return FM_ST_BADPARAM;
    struct conn *c = handle;
    size_t len = strlen(request);
    if (write(c->fd, request, len) != (ssize_t)len)
        return FM_ST_CONNECTION_NOT_VALID;
    size_t have = 0;
    for (;;) {
        if (have + 1 >= size)
            return FM_ST_GENERIC_ERROR;
        ssize_t n = read(c->fd, out + have, size - have - 1);
        if (n <= 0)
            return FM_ST_CONNECTION_NOT_VALID;
        have += (size_t)n;
        out[have] = '\0';
        if (strncmp(out, "E ", 2) == 0 && strchr(out, '\n'))
            return (fmReturn_t)atoi(out + 2);
        if (have >= 2 && strcmp(out + have - 2, ".\n") == 0 &&
            (have == 2 || out[have - 3] == '\n'))
            return FM_ST_SUCCESS;
    }
}

/* For the calls that fill a versioned struct: ``out`` (``size`` bytes, its version field
 * first) checked against ``want``, then ``request`` asked into a reply buffer (*reply) and
 * ``out`` cleared but for its version. */
static fmReturn_t ask_into(fmHandle_t handle, const char *request, void *out, size_t size,
                           unsigned want, char **reply)
{
    static char *buf;
    if (out == NULL)
        return FM_ST_BADPARAM;
    unsigned version = *(unsigned *)out;
    if (version != want)
        return FM_ST_VERSION_MISMATCH;
    if (buf == NULL && (buf = malloc(REPLY_MAX)) == NULL)
        return FM_ST_GENERIC_ERROR;
    fmReturn_t rc = ask(handle, request, buf, REPLY_MAX);
    if (rc != FM_ST_SUCCESS)
        return rc;
    memset(out, 0, size);
    *(unsigned *)out = version;
    *reply = buf;
    return FM_ST_SUCCESS;
}

fmReturn_t fmGetSupportedFabricPartitions(fmHandle_t handle, fmFabricPartitionList_t *list)
{
    char *buf;
    fmReturn_t rc = ask_into(handle, "LIST\n", list, sizeof *list,
                             FM_PARAM_VERSION(fmFabricPartitionList_t, 1), &buf);
    if (rc != FM_ST_SUCCESS)
        return rc;
    list->maxNumPartitions = FM_MAX_FABRIC_PARTITIONS;
    fmFabricPartitionInfo_t *part = NULL;
    char *save = NULL;
    for (char *line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        unsigned id, active, ngpus;
        if (sscanf(line, "P %u %u %u", &id, &active, &ngpus) == 3) {
            if (list->numPartitions >= FM_MAX_FABRIC_PARTITIONS)
                return FM_ST_GENERIC_ERROR;
            part = &list->partitionInfo[list->numPartitions++];
            part->partitionId = id;
            part->isActive = active;
        } else if (line[0] == 'G' && part != NULL) {
            if (part->numGpus >= FM_MAX_NUM_GPUS)
                return FM_ST_GENERIC_ERROR;
            fmFabricPartitionGpuInfo_t *g = &part->gpuInfo[part->numGpus++];
            if (sscanf(line, "G %u %79s %31s %u %u %u", &g->physicalId, g->uuid, g->pciBusId,
                       &g->numNvLinksAvailable, &g->maxNumNvLinks,
                       &g->nvlinkLineRateMBps) != 6)
                return FM_ST_GENERIC_ERROR;
        }
    }
    return FM_ST_SUCCESS;
}

static fmReturn_t simple(fmHandle_t handle, const char *verb, fmFabricPartitionId_t id)
{
    char request[64], reply[256];
    snprintf(request, sizeof request, "%s %u\n", verb, id);
    return ask(handle, request, reply, sizeof reply);
}

fmReturn_t fmActivateFabricPartition(fmHandle_t handle, fmFabricPartitionId_t id)
{
    return simple(handle, "ACTIVATE", id);
}

fmReturn_t fmDeactivateFabricPartition(fmHandle_t handle, fmFabricPartitionId_t id)
{
    return simple(handle, "DEACTIVATE", id);
}

fmReturn_t fmSetActivatedFabricPartitions(fmHandle_t handle,
                                          fmActivatedFabricPartitionList_t *list)
{
    if (list == NULL || list->numPartitions > FM_MAX_FABRIC_PARTITIONS)
        return FM_ST_BADPARAM;
    if (list->version != FM_PARAM_VERSION(fmActivatedFabricPartitionList_t, 1))
        return FM_ST_VERSION_MISMATCH;
    char request[FM_MAX_FABRIC_PARTITIONS * 12 + 8] = "SET";
    size_t used = 3;
    for (unsigned i = 0; i < list->numPartitions; i++)
        used += (size_t)snprintf(request + used, sizeof request - used, " %u",
                                 list->partitionIds[i]);
    snprintf(request + used, sizeof request - used, "\n");
    char reply[256];
    return ask(handle, request, reply, sizeof reply);
}

fmReturn_t fmGetNvlinkFailedDevices(fmHandle_t handle, fmNvlinkFailedDevices_t *devices)
{
    char *buf;
    fmReturn_t rc = ask_into(handle, "FAILED\n", devices, sizeof *devices,
                             FM_PARAM_VERSION(fmNvlinkFailedDevices_t, 1), &buf);
    if (rc != FM_ST_SUCCESS)
        return rc;
    char *save = NULL, *save_ports = NULL;
    for (char *line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char kind[8], ports[512];
        fmNvlinkFailedDeviceInfo_t info = {0};
        if (sscanf(line, "F %7s %79s %31s %511s", kind, info.uuid, info.pciBusId, ports) != 4)
            continue;
        for (char *p = strtok_r(ports, ",", &save_ports);
             p && info.numPorts < FM_MAX_NUM_NVLINK_PORTS; p = strtok_r(NULL, ",", &save_ports))
            info.portNum[info.numPorts++] = (unsigned)strtoul(p, NULL, 10);
        if (strcmp(kind, "gpu") == 0 && devices->numGpus < FM_MAX_NUM_GPUS)
            devices->gpuInfo[devices->numGpus++] = info;
        else if (devices->numSwitches < FM_MAX_NUM_NVSWITCHES)
            devices->switchInfo[devices->numSwitches++] = info;
    }
    return FM_ST_SUCCESS;
}

fmReturn_t fmGetUnsupportedFabricPartitions(fmHandle_t handle,
                                            fmUnsupportedFabricPartitionList_t *list)
{
    char *buf;
    fmReturn_t rc = ask_into(handle, "UNSUPPORTED\n", list, sizeof *list,
                             FM_PARAM_VERSION(fmUnsupportedFabricPartitionList_t, 1), &buf);
    if (rc != FM_ST_SUCCESS)
        return rc;
    char *save = NULL, *save_ids = NULL;
    for (char *line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        unsigned id;
        char ids[256];
        if (sscanf(line, "U %u %255s", &id, ids) != 2 ||
            list->numPartitions >= FM_MAX_FABRIC_PARTITIONS)
            continue;
        fmUnsupportedFabricPartitionInfo_t *u = &list->partitionInfo[list->numPartitions++];
        u->partitionId = id;
        for (char *p = strtok_r(ids, ",", &save_ids); p && u->numGpus < FM_MAX_NUM_GPUS;
             p = strtok_r(NULL, ",", &save_ids))
            u->gpuPhysicalIds[u->numGpus++] = (unsigned)strtoul(p, NULL, 10);
    }
    return FM_ST_SUCCESS;
}
